"""The one chat model the app keeps loaded, decoded by its engine as the server decodes.

Every answer goes through the loaded model's engine (`LoadedModel.engine`: for llama.cpp the
DecodeEngine's continuous batching, with the planner's slots), so the app and `localchat serve`
share one decode path: one thread drives llama.cpp (its OpenMP keeps a thread team per calling
thread, and teams from several threads fight over the cores), answers from several tabs decode
in one batch, and each slot keeps a conversation's prompt cache. Loads and unloads run on one
worker thread of their own; switching model waits for the answers running and frees the old
model first (a laptop holds one).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

from localchat.chat import ChatSession
from localchat.engine.backend import Chunk
from localchat.engine.settings import SamplingSettings
from localchat.planner import Overrides
from localchat.runtime import LoadedModel, open_model
from localchat.store import Store


class ModelSlot:
    def __init__(self, store: Store, overrides: Overrides | None = None) -> None:
        self.store, self.overrides = store, overrides or Overrides()
        self.loaded: LoadedModel | None = None
        self.name = ""
        self._worker = ThreadPoolExecutor(1, "localchat-ui-load")  # loads and unloads never overlap
        self._answers = 0  # answers streaming from the loaded model
        self._idle = threading.Condition()

    def get(self, name: str) -> LoadedModel:
        """The loaded model `name`, loading it (and freeing the previous one) if needed."""
        return self._worker.submit(self._load, name).result()

    def _load(self, name: str) -> LoadedModel:
        if self.loaded is None or self.name != name:
            self._unload()
            self.loaded, self.name = open_model(name, self.overrides, self.store, start_engine=True), name
        return self.loaded

    def session(self, name: str, system: str | None) -> ChatSession:
        loaded = self.get(name)
        return ChatSession.for_model(loaded.backend, loaded.model.defaults, system=system or "")  # "": none

    def stream(self, session: ChatSession, messages: list[dict[str, str]], settings: SamplingSettings,
               cancel: threading.Event, continue_last: bool = False) -> Iterator[Chunk]:
        """Chunks of the answer as the engine decodes them; leaving early (or `cancel`) ends it within a step."""
        with self._idle:
            self._answers += 1
        try:
            yield from session.stream_reply(messages, settings, cancel, continue_last)
        finally:
            with self._idle:
                self._answers -= 1
                self._idle.notify_all()

    def _unload(self) -> None:
        if self.loaded is not None:
            with self._idle:
                self._idle.wait_for(lambda: self._answers == 0)
            self.loaded.close()
            self.loaded, self.name = None, ""

    def close_model(self) -> None:
        """Free the loaded model (after the answers in progress, if any)."""
        self._worker.submit(self._unload).result()

    def close(self) -> None:
        self._worker.submit(self._unload).result()
        self._worker.shutdown(wait=False)
