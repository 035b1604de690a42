"""Boolean buffers (``initialized``, ``signed``) read from a Python copy, so that a forward pass reads no device
tensor: ``bool(buffer)`` on a GPU is a host synchronisation, once per quantizer and step otherwise.

The buffers stay the saved state (checkpoints, ``state_dict``); the copy is taken on first read, updated by
``set_flag`` and dropped when a state dict is loaded into the module. Write the flags through ``set_flag`` only.
"""

from __future__ import annotations

from torch import nn


class HostFlags(nn.Module):
    """Mixin for modules with boolean buffers read in ``forward``."""

    def flag(self, name: str) -> bool:
        cache = self.__dict__.setdefault("_host_flags", {})
        if name not in cache:
            cache[name] = bool(getattr(self, name))
        return cache[name]

    def set_flag(self, name: str, value: bool) -> None:
        getattr(self, name).fill_(bool(value))
        self.__dict__.setdefault("_host_flags", {})[name] = bool(value)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.__dict__.pop("_host_flags", None)
