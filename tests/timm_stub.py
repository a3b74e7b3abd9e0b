"""Imports timm without torchvision, which has no CPU build on these machines.

timm's EfficientViT code needs nothing from torchvision; its package imports a few
torchvision names at import time. Stand-ins for those modules are enough.
"""
import importlib
import importlib.machinery
import sys
import types

_MODULES = (
    "torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
    "torchvision.transforms.functional", "torchvision.transforms.v2", "torchvision.models",
    "torchvision.models.feature_extraction", "torchvision.datasets", "torchvision.utils",
    "torchvision.io",
)


class _AnyAttribute(type):
    """A class whose every attribute is a distinct stand-in (e.g. ``InterpolationMode.NEAREST``)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return f"{cls.__name__}.{name}"


class _StandIn(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _AnyAttribute(name, (), {})  # any class or constant timm names at import time


def import_timm():
    """Returns the timm package, or None where it is not installed."""
    if importlib.util.find_spec("timm") is None:
        return None
    if importlib.util.find_spec("torchvision") is None:
        for name in _MODULES:
            if name not in sys.modules:
                module = _StandIn(name)
                module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
                module.__path__ = []
                sys.modules[name] = module
                parent, _, child = name.rpartition(".")
                if parent:
                    setattr(sys.modules[parent], child, module)
    return importlib.import_module("timm")
