"""Reading what the commands compute on: a model (``--model``, ``--weights``, ``--device``) and
batches of inputs (``--x1``, ``--x2``: .npy, .npz, .pt files), with :class:`CLIError` for any
problem in them."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from .._torch_private import pytree

from .. import zoo
from .errors import CLIError

# ---------------------------------------------------------------------------- model


@contextmanager
def cwd_on_path() -> Iterator[None]:
    """Make modules in the current directory importable, as ``python -m`` does."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def import_target(spec: str) -> Any:
    """The object named by ``MODULE:ATTR`` (ATTR may be dotted; MODULE may be a .py path).

    Raises:
        CLIError: a malformed spec, a module that is missing or fails to import, a missing attribute.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise CLIError(f"--model {spec!r}: expected MODULE:ATTR, e.g. mypkg.nets:make_model or nets.py:model")
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise CLIError(f"--model {spec!r}: no such file {module_name!r}")
        name = f"_fastntk_cli_model_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise CLIError(f"--model {spec!r}: cannot import {module_name!r} as Python source")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise CLIError(f"--model {spec!r}: importing {module_name} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                raise CLIError(f"--model {spec!r}: no module named {module_name!r} (run from its directory, or give a path to the .py file)") from exc
            raise CLIError(f"--model {spec!r}: importing {module_name} failed: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            raise CLIError(f"--model {spec!r}: importing {module_name} failed: {type(exc).__name__}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise CLIError(f"--model {spec!r}: {module_name} has no attribute {attr!r}") from None
    return target


def load_model(args: argparse.Namespace) -> tuple[nn.Module, str]:
    """The model of ``args`` (weights loaded, eval mode unless --train-mode) and a description."""
    if args.model is None:
        model: nn.Module = zoo.tutorial_cnn(seed=args.seed)
        label = f"tutorial_cnn(seed={args.seed}) from fastntk.zoo"
    else:
        with cwd_on_path():
            target = import_target(args.model)
            if isinstance(target, nn.Module):
                model = target
            elif callable(target):
                try:
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(args.seed)
                        model = target()
                except Exception as exc:
                    raise CLIError(f"--model {args.model!r}: calling it failed: {type(exc).__name__}: {exc}") from exc
                if not isinstance(model, nn.Module):
                    raise CLIError(f"--model {args.model!r}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
            else:
                raise CLIError(f"--model {args.model!r} is a {type(target).__name__}: it must be an nn.Module or a callable returning one")
        label = args.model
    if args.weights is not None:
        load_weights(model, args.weights)
        label += f", weights {args.weights}"
    if not args.train_mode:
        model.eval()
    if args.device is not None:
        device = parse_device(args.device)
        try:
            model.to(device)
        except Exception as exc:
            raise CLIError(f"--device {args.device}: cannot move the model there: {type(exc).__name__}: {exc}") from exc
    return model, f"{label} ({type(model).__name__})"


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state_dict file into ``model`` strictly."""
    if not Path(path).is_file():
        raise CLIError(f"--weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CLIError(f"--weights {path}: cannot load it with torch.load(weights_only=True): {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CLIError(
            f"--weights {path} holds a {type(state).__name__}, not a state_dict (a dict of tensors); "
            "save model.state_dict(), not a checkpoint or the whole model"
        )
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        raise CLIError(f"--weights {path} does not fit the model: {exc}") from exc


def parse_device(text: str) -> torch.device:
    """A usable torch.device, or CLIError."""
    try:
        device = torch.device(text)
    except Exception:
        raise CLIError(f"--device {text!r} is not a device: use cpu, cuda, cuda:1, ...") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {text}: CUDA is not available here (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {text}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return device


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The model's floating dtype, or None if it has none or several."""
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first tensor (CPU for a model without any)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------- inputs


def split_key(spec: str) -> tuple[str, str | None]:
    """``FILE`` or ``FILE:KEY`` -> (file, key); an existing file name containing ':' wins."""
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    path, _, key = spec.rpartition(":")
    return path, key or None


def to_tensor(value: Any, what: str) -> torch.Tensor:
    """A numpy array or tensor as a tensor."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object or value.dtype.kind not in "biufc":
            raise CLIError(f"{what} has numpy dtype {value.dtype}: inputs must be numeric arrays")
        if not value.dtype.isnative:
            value = value.astype(value.dtype.newbyteorder("="))
        return torch.from_numpy(np.ascontiguousarray(value))
    raise CLIError(f"{what} holds a {type(value).__name__}: expected a tensor or array")


def load_batch(spec: str, flag: str) -> Any:
    """A batch from a .npy, .npz or .pt file: a tensor, or a tuple/list/dict of tensors."""
    path, key = split_key(spec)
    what = f"{flag} {spec}"
    if not Path(path).is_file():
        raise CLIError(f"{what}: no such file")
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".npy":
            if key is not None:
                raise CLIError(f"{what}: a .npy file holds one array; :KEY is for .npz and .pt files")
            return to_tensor(np.load(path, allow_pickle=False), what)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.files)
                if not names:
                    raise CLIError(f"{what}: the .npz file holds no array")
                if key is not None and key not in names:
                    raise CLIError(f"{what}: no array {key!r} in {path}; it holds {', '.join(map(repr, names))}")
                return to_tensor(archive[key if key is not None else names[0]], what)
        if suffix in (".pt", ".pth"):
            value = torch.load(path, map_location="cpu", weights_only=True)
            if key is not None:
                if not isinstance(value, Mapping) or key not in value:
                    held = f"keys {', '.join(map(repr, value))}" if isinstance(value, Mapping) else f"a {type(value).__name__}"
                    raise CLIError(f"{what}: no entry {key!r} in {path}; it holds {held}")
                value = value[key]
            return check_batch_structure(value, what)
    except CLIError:
        raise
    except Exception as exc:
        raise CLIError(f"{what}: cannot read it: {type(exc).__name__}: {exc}") from exc
    raise CLIError(f"{what}: unsupported file type {suffix or '(none)'!r}: use .npy, .npz or .pt")


def check_batch_structure(value: Any, what: str) -> Any:
    """``value`` if it is a tensor or a tuple/list/dict of tensors, else CLIError."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    if isinstance(value, Mapping) and value and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()):
        return dict(value)
    raise CLIError(f"{what} holds a {type(value).__name__}: expected a tensor, or a non-empty tuple/list/dict (str keys) of tensors")


def fit_inputs(x: Any, device: torch.device, dtype: torch.dtype | None) -> tuple[Any, list[str]]:
    """Move a batch to ``device`` and cast floating tensors to ``dtype``; also say which dtypes were cast."""
    casts: list[str] = []

    def fit(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            casts.append(f"{str(t.dtype).removeprefix('torch.')} -> {str(dtype).removeprefix('torch.')}")
            t = t.to(dtype)
        return t.to(device)

    return pytree.tree_map(fit, x), sorted(set(casts))
