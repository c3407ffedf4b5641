"""The local model store (`models/`, or $LOCALCHAT_HOME)."""

from .manifest import ModelEntry, ModelFile, Store, StoreError
from .names import UnsafeNameError, check_name, check_relative
from .paths import ENV_HOME, store_root
from .resolve import ModelNotFound, ResolvedModel, resolve_model
from .starter import DEFAULT_MODEL, STARTER, install_starter

__all__ = ["DEFAULT_MODEL", "ENV_HOME", "STARTER", "ModelEntry", "ModelFile", "ModelNotFound",
           "ResolvedModel", "Store", "StoreError", "UnsafeNameError", "check_name", "check_relative",
           "default_store", "install_starter", "resolve_model", "store_root"]


def default_store() -> Store:
    return Store(store_root())
