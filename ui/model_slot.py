"""The one chat model the app keeps loaded, and the thread every decode runs on.

Gradio calls handlers from a pool of threads; llama.cpp keeps an OpenMP thread team per
calling thread, and teams from several threads fight over the cores. So every decode
runs on one dedicated thread and chunks cross to the handler through a queue. Switching
model waits for the running answer and frees the old model first (a laptop holds one).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

from localchat.chat import ChatSession
from localchat.engine.backend import Chunk
from localchat.engine.batching import emit_all, stream_from
from localchat.engine.settings import SamplingSettings
from localchat.planner import Overrides
from localchat.runtime import LoadedModel, open_model
from localchat.store import Store


class ModelSlot:
    def __init__(self, store: Store, overrides: Overrides | None = None) -> None:
        self.store, self.overrides = store, overrides or Overrides()
        self.loaded: LoadedModel | None = None
        self.name = ""
        # Loads, decodes and unloads all run on this one thread, so they never overlap.
        self._worker = ThreadPoolExecutor(1, "localchat-ui-decode")

    def get(self, name: str) -> LoadedModel:
        """The loaded model `name`, loading it (and freeing the previous one) if needed."""
        return self._worker.submit(self._load, name).result()

    def _load(self, name: str) -> LoadedModel:
        if self.loaded is None or self.name != name:
            self._unload()
            self.loaded = open_model(name, self.overrides, self.store)
            self.name = name
        return self.loaded

    def session(self, name: str, system: str | None) -> ChatSession:
        loaded = self.get(name)
        return ChatSession.for_model(loaded.backend, loaded.model.defaults, system=system or "")  # "": none

    def stream(self, session: ChatSession, messages: list[dict[str, str]], settings: SamplingSettings,
               cancel: threading.Event, continue_last: bool = False) -> Iterator[Chunk]:
        """Chunks of the answer, produced on the decode thread; leaving early (or `cancel`) stops the decode
        within a token."""
        return stream_from(lambda emit: self._worker.submit(
            emit_all, lambda: session.stream_reply(messages, settings, cancel, continue_last), emit, cancel), cancel)

    def _unload(self) -> None:
        if self.loaded is not None:
            self.loaded.backend.close()
            self.loaded, self.name = None, ""

    def close_model(self) -> None:
        """Free the loaded model (after the answer in progress, if any)."""
        self._worker.submit(self._unload).result()

    def close(self) -> None:
        self._worker.submit(self._unload).result()
        self._worker.shutdown(wait=False)
