"""A grammar of small architectures for the differential fuzzer: model specs as data.

A :class:`Spec` is plain data (families, op tuples, sizes, seeds), so hypothesis shrinks
a failure to a short printable spec, and :func:`build` turns it into an ``nn.Module``
(:class:`FuzzNet`, an interpreter of the ops) and :func:`draw_inputs` into inputs.

Per-sample states are tuples of sizes: ``(F,)`` features, ``(C, *spatial)`` for
convolutions, ``(S, E)`` sequences. Every op acts on the whole batch ``(N, *state)``.
Norms never normalise a single value (LayerNorm over one feature, GroupNorm over one
element): their output is then constant, the exact kernel of what precedes them is 0, and
the rounding noise the reference and the methods compute instead has no scale to compare to.
For the same reason weight_norm is applied only to layers of more than one input, and no
norm directly follows a scale or another norm (the norm would cancel that op's parameters
but for its eps, leaving a kernel that float32 computes only to a few digits).

Ops (first element names them; ``key`` is the ModuleDict key of an earlier op):

- ("linear", out, bias, weight_norm), ("act", name), ("layernorm", affine), ("scale",)
- ("residual", ops), ("concat", ops_a, ops_b), ("product", ops_a, ops_b): branches
- ("twice", op, act): one module applied twice; ("again", key): an earlier module reapplied
- ("tied_linear", key, transposed): F.linear with an earlier Linear's weight (or its transpose)
- ("shared_weight", key, bias): a new Linear whose weight IS an earlier Linear's (an alias name)
- ("ln_weight", key): the state times an earlier LayerNorm's weight
- ("conv", d, out, k, stride, padding, dilation, groups, bias, padding_mode)
- ("convT", d, out, k, stride, padding, output_padding, dilation, groups, bias)
- ("tied_convT", key): F.conv_transposeNd with an earlier convolution's weight
- ("groupnorm", groups, affine), ("batchnorm",), ("pool", kind, k), ("adaptive", kind, size)
- ("guard",): data-dependent control flow (halve the state if any entry exceeds 1e6: never)
- ("flatten",), ("transpose",) (last two dims), ("swap_spatial",), ("unflatten", a), ("mean",)
- ("embed", vocab, dim, padding_idx), ("tied_out", key): logits by an embedding's weight
- ("mha", heads), ("sdpa", heads, causal), ("rnn", kind, hidden, layers, bidirectional)

The head flattens the state, joins the auxiliary input (tuple/dict inputs) and forms the
outputs: "linear", "identity", "scalar" (N,), "multidim" (N, 2, O), "tuple", "dict".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

SUPPORTED_ACTIVATIONS = ("relu", "relu_", "tanh", "sigmoid", "gelu", "silu")
"""Activations the structured method's chain has rules for (relu_ is ReLU(inplace=True))."""
UNSUPPORTED_ACTIVATIONS = ("softplus", "elu", "leaky_relu", "hardswish", "gelu_tanh", "mish")
"""Activations without such a rule: the structured method must fall back correctly."""
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "relu_": lambda: nn.ReLU(inplace=True), "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU, "silu": nn.SiLU, "softplus": nn.Softplus, "elu": nn.ELU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1), "hardswish": nn.Hardswish,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "mish": nn.Mish,
}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
F_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOL = {("avg", 1): nn.AvgPool1d, ("avg", 2): nn.AvgPool2d, ("avg", 3): nn.AvgPool3d,
        ("max", 1): nn.MaxPool1d, ("max", 2): nn.MaxPool2d, ("max", 3): nn.MaxPool3d}
ADAPTIVE = {("avg", 1): nn.AdaptiveAvgPool1d, ("avg", 2): nn.AdaptiveAvgPool2d, ("avg", 3): nn.AdaptiveAvgPool3d,
            ("max", 1): nn.AdaptiveMaxPool1d, ("max", 2): nn.AdaptiveMaxPool2d, ("max", 3): nn.AdaptiveMaxPool3d}
RNNS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
AUX = 3
"""Features of the auxiliary input of tuple/dict-input models."""

Op = tuple
State = tuple[int, ...]


@dataclass(frozen=True)
class Spec:
    """A model and its inputs, all determined by these fields.

    Attributes:
        family: the grammar family that drew it.
        input: the per-sample state of the main input; for token ids ("ids", vocab, length, pad).
        inputs: "tensor", or "tuple"/"dict" (the main input and an auxiliary (N, AUX) one).
        ops: the trunk, in order.
        output: the head's kind; outputs: its O per output tensor.
        frozen: indices (mod P) of parameters set to requires_grad=False.
        params: None, or indices (mod P) of the parameters selected by name (aliases included).
        train: the model's train flag (BatchNorm layers are always in eval mode).
        n1, n2, seed: sample counts and the seed of weights and inputs.
    """

    family: str
    input: tuple
    inputs: str
    ops: tuple[Op, ...]
    output: str
    outputs: int
    frozen: tuple[int, ...]
    params: tuple[int, ...] | None
    train: bool
    n1: int
    n2: int
    seed: int


# ----------------------------------------------------------------------------------------- the interpreter


class FuzzNet(nn.Module):
    """The model a spec describes: modules by op position in ``mods``, ops run in ``forward``."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        self.mods = nn.ModuleDict()
        state = initial_state(spec)
        for i, op in enumerate(spec.ops):
            state = add_op(self.mods, op, f"m{i}", state)
        self.head = nn.ModuleDict()
        features = math.prod(state) + (2 if spec.inputs != "tensor" else 0)
        if spec.inputs != "tensor":
            self.head["aux"] = nn.Linear(AUX, 2)
        outs = {"linear": spec.outputs, "scalar": 1, "multidim": 2 * spec.outputs, "tuple": spec.outputs, "dict": spec.outputs}
        if spec.output in outs:
            self.head["out"] = nn.Linear(features, outs[spec.output])
        if spec.output in ("tuple", "dict"):
            self.head["out2"] = nn.Linear(features, 1)

    def forward(self, x: torch.Tensor, aux: torch.Tensor | None = None) -> Any:
        h = x
        for i, op in enumerate(self.spec.ops):
            h = run_op(self.mods, op, f"m{i}", h)
        h = h.flatten(1)
        if aux is not None:
            h = torch.cat([h, torch.tanh(self.head["aux"](aux))], dim=1)
        kind = self.spec.output
        if kind == "identity":
            return h
        y = self.head["out"](h)
        if kind == "scalar":
            return y.squeeze(-1)
        if kind == "multidim":
            return y.reshape(-1, 2, self.spec.outputs)
        if kind == "tuple":
            return y, self.head["out2"](h)
        if kind == "dict":
            return {"b": self.head["out2"](h), "a": y}
        return y


def initial_state(spec: Spec) -> State:
    return (spec.input[2],) if spec.input[0] == "ids" else tuple(spec.input)


def add_op(mods: nn.ModuleDict, op: Op, key: str, state: State) -> State:
    """Create the modules of ``op`` under ``key`` (and keys below it); return the state after it."""
    kind = op[0]
    if kind == "linear":
        _, out, bias, wn = op
        layer = nn.Linear(state[-1], out, bias=bias)
        # weight_norm of one input is g·sign(v): a derivative in v that is 0 but for rounding (see above)
        mods[key] = nn.utils.parametrizations.weight_norm(layer) if wn and state[-1] > 1 else layer
    elif kind == "act":
        mods[key] = ACTIVATIONS[op[1]]()
    elif kind == "layernorm":
        mods[key] = nn.LayerNorm(state[-1], elementwise_affine=op[1])
        if op[1]:
            with torch.no_grad():
                mods[key].weight.uniform_(0.5, 1.5)
                mods[key].bias.uniform_(-0.5, 0.5)
    elif kind == "scale":
        mods[key] = Scale()
    elif kind == "shared_weight":
        source = mods[op[1]]
        layer = nn.Linear(source.in_features, source.out_features, bias=op[2])
        layer.weight = source.weight
        mods[key] = layer
    elif kind == "residual":
        add_ops(mods, op[1], key + "r", state)
    elif kind in ("concat", "product"):
        add_ops(mods, op[1], key + "a", state)
        add_ops(mods, op[2], key + "b", state)
    elif kind == "twice":
        add_op(mods, op[1], key + "t", state)
        mods[key + "act"] = ACTIVATIONS[op[2]]()
    elif kind == "conv":
        _, d, out, k, stride, padding, dilation, groups, bias, padding_mode = op
        mods[key] = CONV[d](state[0], out, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode)
    elif kind == "convT":
        _, d, out, k, stride, padding, output_padding, dilation, groups, bias = op
        mods[key] = CONV_T[d](state[0], out, k, stride=stride, padding=padding, output_padding=output_padding, dilation=dilation, groups=groups, bias=bias)
    elif kind == "groupnorm":
        mods[key] = nn.GroupNorm(op[1], state[0], affine=op[2])
    elif kind == "batchnorm":
        bn = BATCHNORM[len(state) - 1](state[0])
        with torch.no_grad():
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        mods[key] = bn
    elif kind == "pool":
        mods[key] = POOL[op[1], len(state) - 1](op[2])
    elif kind == "adaptive":
        mods[key] = ADAPTIVE[op[1], len(state) - 1](op[2])
    elif kind == "embed":
        _, vocab, dim, padding_idx = op
        mods[key] = nn.Embedding(vocab, dim, padding_idx=padding_idx)
    elif kind == "mha":
        mods[key] = nn.MultiheadAttention(state[-1], op[1], batch_first=True)
    elif kind == "sdpa":
        mods[key] = nn.Linear(state[-1], 3 * state[-1])
    elif kind == "rnn":
        _, cell, hidden, layers, bidirectional = op
        mods[key] = RNNS[cell](state[-1], hidden, num_layers=layers, bidirectional=bidirectional, batch_first=True)
    return shape_after(mods, op, key, state)


def add_ops(mods: nn.ModuleDict, ops: tuple[Op, ...], prefix: str, state: State) -> State:
    for j, op in enumerate(ops):
        state = add_op(mods, op, f"{prefix}{j}", state)
    return state


def shape_after(mods: nn.ModuleDict, op: Op, key: str, state: State) -> State:
    """The per-sample state after ``op``, by running it on one sample of zeros."""
    if op[0] == "embed":
        return (state[0], op[2])
    with torch.no_grad():
        return tuple(run_op(mods, op, key, torch.zeros(1, *state)).shape[1:])


def run_op(mods: nn.ModuleDict, op: Op, key: str, h: torch.Tensor) -> torch.Tensor:
    """Apply ``op`` to the batch ``h``."""
    kind = op[0]
    if kind in ("linear", "shared_weight", "act", "layernorm", "scale", "conv", "convT", "groupnorm", "batchnorm", "pool", "adaptive", "embed"):
        return mods[key](h)
    if kind == "residual":
        return h + run_ops(mods, op[1], key + "r", h)
    if kind == "concat":
        dim = 1 if h.dim() > 2 and "conv" in {o[0] for o in op[1]} else -1
        return torch.cat([run_ops(mods, op[1], key + "a", h), run_ops(mods, op[2], key + "b", h)], dim=dim)
    if kind == "product":
        return run_ops(mods, op[1], key + "a", h) * run_ops(mods, op[2], key + "b", h)
    if kind == "twice":
        inner = key + "t"
        return run_op(mods, op[1], inner, mods[key + "act"](run_op(mods, op[1], inner, h)))
    if kind == "again":
        return mods[op[1]](h)
    if kind == "tied_linear":
        w = mods[op[1]].weight
        return F.linear(h, w.T if op[2] else w)
    if kind == "ln_weight":
        return h * mods[op[1]].weight
    if kind == "tied_convT":
        conv = mods[op[1]]
        return F_CONV_T[conv.weight.dim() - 2](h, conv.weight, stride=conv.stride, dilation=conv.dilation)
    if kind == "tied_out":
        return F.linear(h, mods[op[1]].weight)
    if kind == "guard":
        return h * 0.5 if bool((h.abs() > 1e6).any()) else h
    if kind == "flatten":
        return h.flatten(1)
    if kind == "transpose":
        return h.transpose(-1, -2)
    if kind == "swap_spatial":
        return h.permute(0, 1, *range(h.dim() - 1, 1, -1))
    if kind == "unflatten":
        return h.reshape(h.shape[0], op[1], -1)
    if kind == "mean":
        return h.mean(1)
    if kind == "mha":
        return mods[key](h, h, h, need_weights=False)[0]
    if kind == "sdpa":
        n, s, e = h.shape
        heads = op[1]
        q, k, v = (t.reshape(n, s, heads, e // heads).transpose(1, 2) for t in mods[key](h).chunk(3, dim=-1))
        return F.scaled_dot_product_attention(q, k, v, is_causal=op[2]).transpose(1, 2).reshape(n, s, e)
    if kind == "rnn":
        return mods[key](h)[0]
    raise AssertionError(f"unknown op {op!r}")


def run_ops(mods: nn.ModuleDict, ops: tuple[Op, ...], prefix: str, h: torch.Tensor) -> torch.Tensor:
    for j, op in enumerate(ops):
        h = run_op(mods, op, f"{prefix}{j}", h)
    return h


class Scale(nn.Module):
    """A learnable 0-d scale: a parameter no structured rule covers."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.25))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.scale * h


# ----------------------------------------------------------------------------------------- building


def build(spec: Spec, dtype: torch.dtype) -> nn.Module:
    """The spec's model in ``dtype`` with its frozen parameters and train flags set."""
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        model = FuzzNet(spec)
    model = model.to(dtype).train(spec.train)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    names = list(dict(model.named_parameters()))
    frozen = {names[i % len(names)] for i in spec.frozen}
    if spec.params is None and frozen >= set(names):
        frozen.discard(names[-1])
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    return model


def selection(spec: Spec, model: nn.Module) -> list[str] | None:
    """The ``params=`` names of the spec (None: every parameter with requires_grad)."""
    if spec.params is None:
        return None
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]  # aliases of tied weights too
    return list(dict.fromkeys(names[i % len(names)] for i in spec.params))


def draw_inputs(spec: Spec, n: int, which: int, dtype: torch.dtype) -> Any:
    """n samples of the spec's inputs (which=1 for x1, 2 for x2), as the model takes them."""
    g = torch.Generator().manual_seed(spec.seed * 4 + which)
    if spec.input[0] == "ids":
        _, vocab, length, pad = spec.input
        x = torch.randint(0, vocab, (n, length), generator=g)
        x[:, 0] = 0 if pad is None else pad  # a shared (padding) index in every sample
    else:
        x = torch.randn(n, *spec.input, generator=g, dtype=torch.float64).to(dtype)
    if spec.inputs == "tensor":
        return x
    aux = torch.randn(n, AUX, generator=g, dtype=torch.float64).to(dtype)
    return (x, aux) if spec.inputs == "tuple" else {"aux": aux, "x": x}


# ----------------------------------------------------------------------------------------- strategies


@dataclass
class Scope:
    """What the ops drawn so far offer for reuse, and the state they leave."""

    state: State
    mods: nn.ModuleDict
    counter: int = 0
    last: str = ""
    linears: list[tuple[str, int, int]] = field(default_factory=list)  # (key, in, out)
    convs: list[tuple[str, int, int, int]] = field(default_factory=list)  # (key, d, cin, cout)
    norms: list[tuple[str, int]] = field(default_factory=list)  # (key, dim)
    square: list[tuple[str, State]] = field(default_factory=list)  # (key, state): modules mapping a state to itself
    embeddings: list[tuple[str, int]] = field(default_factory=list)  # (key, dim)

    def push(self, op: Op) -> Op:
        """Record ``op`` as the next top-level op (validated by building it: one invalid for
        the state becomes a tanh) and advance the state."""
        key = f"m{self.counter}"
        self.counter += 1
        before = self.state
        known = set(self.mods)
        try:
            self.state = add_op(self.mods, op, key, before)
        except (RuntimeError, ValueError):
            for stale in set(self.mods) - known:
                del self.mods[stale]
            op = ("act", "tanh")
            self.state = add_op(self.mods, op, key, before)
        self.last = op[0]
        if op[0] == "linear" and not op[3]:
            self.linears.append((key, before[-1], op[1]))
        if op[0] == "conv" and op[7] == 1:
            self.convs.append((key, op[1], before[0], op[2]))
        if op[0] == "layernorm" and op[1]:
            self.norms.append((key, before[-1]))
        if op[0] == "embed":
            self.embeddings.append((key, op[2]))
        if op[0] in ("linear", "conv") and self.state == before:
            self.square.append((key, before))
        return op


def activation(draw: Callable) -> str:
    return draw(st.sampled_from(SUPPORTED_ACTIVATIONS + UNSUPPORTED_ACTIVATIONS))


def linear_op(draw: Callable, out: int | None = None) -> Op:
    out = out if out is not None else draw(st.integers(1, 8))
    return ("linear", out, draw(st.booleans()), draw(st.sampled_from([False] * 7 + [True])))


def conv_op(draw: Callable, state: State, out: int | None = None, same: bool = False) -> Op:
    """A convolution valid on ``state`` (with ``same``: one that keeps the spatial size)."""
    d, cin, size = len(state) - 1, state[0], min(state[1:])
    out = out if out is not None else draw(st.integers(1, 6))
    groups = draw(st.sampled_from([g for g in (1, 2, 3) if cin % g == 0 and out % g == 0]))
    k = draw(st.integers(1, min(3, size)))
    dilation = draw(st.integers(1, 2)) if (k - 1) * 2 + 1 <= size else 1
    mode = draw(st.sampled_from(["zeros", "zeros", "zeros", "reflect", "circular"]))
    if same or draw(st.booleans()):
        return ("conv", d, out, k, 1, "same", dilation, groups, draw(st.booleans()), mode)
    stride = draw(st.integers(1, 2))
    padding = draw(st.integers(0, min(dilation * (k - 1), size - 1)))
    if mode != "zeros" and padding == 0:
        mode = "zeros"
    return ("conv", d, out, k, stride, padding, dilation, groups, draw(st.booleans()), mode)


def conv_t_op(draw: Callable, state: State) -> Op:
    d, cin = len(state) - 1, state[0]
    out = draw(st.integers(1, 6))
    groups = draw(st.sampled_from([g for g in (1, 2) if cin % g == 0 and out % g == 0]))
    k, stride, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    padding = draw(st.integers(0, dilation * (k - 1)))
    output_padding = draw(st.integers(0, max(stride, dilation) - 1))
    return ("convT", d, out, k, stride, padding, output_padding, dilation, groups, draw(st.booleans()))


def branch(draw: Callable, scope: Scope, kind: str, conv_like: bool) -> Op:
    """A residual add, a concatenation or a product of branches from the current state
    (branches of convolutions keeping the spatial size when ``conv_like``)."""
    state = scope.state

    def mapping(out: int) -> Op:
        return conv_op(draw, state, out, same=True) if conv_like else linear_op(draw, out)

    width = state[0] if conv_like else state[-1]
    if kind == "residual":
        ops = [mapping(width), ("act", activation(draw))] if draw(st.booleans()) else [("act", activation(draw)), mapping(width)]
        ops = tuple(o if o[0] != "act" or o[1] != "relu_" else ("act", "relu") for o in ops)
        op = ("residual", ops)
    else:
        a = draw(st.integers(1, 4))
        b = a if kind == "product" else draw(st.integers(1, 4))
        op = (kind, (mapping(a), ("act", activation(draw).replace("relu_", "relu"))), (mapping(b),))
    return scope.push(op)


@st.composite
def trunk_op(draw: Callable, scope: Scope, family: str) -> Op:
    """One op valid on the scope's state, of the kinds ``family`` draws."""
    state = scope.state
    choices = ["act", "linear"]
    if family in ("dense", "sequence", "embedding", "io"):
        choices += ["layernorm", "residual", "concat", "product", "twice", "scale", "guard"]
        if scope.linears:
            choices += ["tied_linear"]
        if scope.norms:
            choices += ["ln_weight"]
        if [s for s in scope.square if s[1] == state]:
            choices += ["again"]
    if family == "conv" and len(state) >= 2:
        choices = ["act", "conv", "conv", "convT", "groupnorm", "batchnorm", "pool", "adaptive", "residual", "concat", "product", "twice"]
        if len(state) == 3:
            choices += ["swap_spatial"]
        if [c for c in scope.convs if c[3] == state[0] and c[1] == len(state) - 1]:
            choices += ["tied_convT"]
        if [s for s in scope.square if s[1] == state]:
            choices += ["again"]
    if family in ("sequence", "embedding") and len(state) == 2:
        choices += ["transpose", "mha", "sdpa"]
        if family == "embedding" and scope.embeddings and any(e[1] == state[-1] for e in scope.embeddings):
            choices += ["tied_out"]
    if family == "recurrent" and len(state) == 2:
        choices = ["rnn", "rnn", "act", "linear"]
    if family == "dense" and len(state) == 1 and state[0] in (4, 6, 8):
        choices += ["unflatten"]
    reuse = [c for c in choices if c in REUSE]
    kind = draw(st.sampled_from(reuse)) if reuse and draw(st.booleans()) else draw(st.sampled_from(choices))
    if kind in NORMS and scope.last in ("scale", "ln_weight", *NORMS):
        kind = "act"
    if kind == "act":
        name = activation(draw)
        if name == "relu_" and scope.last not in ("linear", "conv", "convT"):
            name = "relu"  # in place only on a layer's own output (not on the caller's input or a shared state)
        return scope.push(("act", name))
    if kind == "linear":
        return scope.push(linear_op(draw, state[-1] if draw(st.booleans()) else None))
    if kind == "layernorm":
        return scope.push(("layernorm", draw(st.booleans())) if state[-1] > 1 else ("act", "tanh"))
    if kind in ("scale", "guard"):
        return scope.push((kind,))
    if kind in ("residual", "concat", "product"):
        return branch(draw, scope, kind, conv_like=family == "conv")
    if kind == "twice":
        inner = conv_op(draw, state, state[0], same=True) if family == "conv" else linear_op(draw, state[-1])
        return scope.push(("twice", inner, activation(draw).replace("relu_", "relu")))
    if kind == "again":
        return scope.push(("again", draw(st.sampled_from([s[0] for s in scope.square if s[1] == state]))))
    if kind == "tied_linear":
        key, a, b = draw(st.sampled_from(scope.linears))
        if state[-1] == a:
            return scope.push(("shared_weight", key, draw(st.booleans())) if draw(st.booleans()) else ("tied_linear", key, False))
        if state[-1] == b:
            return scope.push(("tied_linear", key, True))
        return scope.push(linear_op(draw, a))  # brings the state to where the tie fits next time
    if kind == "ln_weight":
        fitting = [k for k, dim in scope.norms if dim == state[-1]]
        return scope.push(("ln_weight", draw(st.sampled_from(fitting)))) if fitting else scope.push(linear_op(draw, scope.norms[-1][1]))
    if kind == "unflatten":
        return scope.push(("unflatten", 2))
    if kind == "conv":
        return scope.push(conv_op(draw, state))
    if kind == "convT":
        if math.prod(state) > 64:
            return scope.push(("pool", "avg", 2))
        return scope.push(conv_t_op(draw, state))
    if kind == "tied_convT":
        fitting = [c[0] for c in scope.convs if c[3] == state[0] and c[1] == len(state) - 1]
        return scope.push(("tied_convT", draw(st.sampled_from(fitting))))
    if kind == "groupnorm":
        groups = draw(st.sampled_from([g for g in (1, 2, 3) if state[0] % g == 0]))
        if state[0] // groups * math.prod(state[1:]) < 2:
            return scope.push(("act", "tanh"))
        return scope.push(("groupnorm", groups, draw(st.booleans())))
    if kind == "batchnorm":
        return scope.push(("batchnorm",))
    if kind == "pool":
        if min(state[1:]) < 2:
            return scope.push(("act", activation(draw)))
        return scope.push(("pool", draw(st.sampled_from(["avg", "max"])), 2))
    if kind == "adaptive":
        return scope.push(("adaptive", draw(st.sampled_from(["avg", "max"])), draw(st.integers(1, 2))))
    if kind == "swap_spatial":
        return scope.push(("swap_spatial",))
    if kind == "transpose":
        return scope.push(("transpose",))
    if kind == "mha":
        e = state[-1]
        return scope.push(("mha", draw(st.sampled_from([h for h in (1, 2) if e % h == 0]))))
    if kind == "sdpa":
        e = state[-1]
        return scope.push(("sdpa", draw(st.sampled_from([h for h in (1, 2) if e % h == 0])), draw(st.booleans())))
    if kind == "tied_out":
        key = draw(st.sampled_from([k for k, dim in scope.embeddings if dim == state[-1]]))
        return scope.push(("tied_out", key))
    if kind == "rnn":
        return scope.push(("rnn", draw(st.sampled_from(sorted(RNNS))), draw(st.integers(1, 4)), draw(st.integers(1, 2)), draw(st.booleans())))
    raise AssertionError(kind)


def first_input(draw: Callable, family: str) -> tuple:
    if family in ("dense", "io"):
        return (draw(st.integers(1, 6)),)
    if family == "conv":
        d = draw(st.integers(1, 3))
        sizes = {1: (4, 9), 2: (3, 6), 3: (2, 4)}[d]
        return (draw(st.integers(1, 3)), *(draw(st.integers(*sizes)) for _ in range(d)))
    if family in ("sequence", "recurrent"):
        return (draw(st.integers(1, 4)), draw(st.sampled_from([1, 2, 3, 4, 6])))
    vocab = draw(st.integers(3, 8))
    return ("ids", vocab, draw(st.integers(1, 4)), draw(st.one_of(st.none(), st.integers(0, vocab - 1))))


NORMS = ("layernorm", "groupnorm", "batchnorm")
REUSE = ("again", "tied_linear", "ln_weight", "tied_convT", "tied_out")
"""Ops that reuse an earlier module or weight: drawn half the time when one fits."""

TAIL_ACTIVATIONS = ("tanh", "relu", "gelu", "sigmoid")
"""Activations of the compact tail of dense specs (see :func:`compact_tail`)."""


def compact_tail(spec: Spec) -> bool:
    """Whether the spec's trunk ends with a dense layer and a supported activation before a
    dense output layer: then in trace mode the structured method may keep that layer's
    cotangents compact (``RowsPairFactor``) if the model is a chain."""
    ops = spec.ops
    return (
        len(ops) >= 2 and ops[-2][0] == "linear" and ops[-1][0] == "act" and ops[-1][1] in SUPPORTED_ACTIVATIONS
        and spec.output in ("linear", "tuple") and spec.inputs == "tensor"
    )


FAMILIES = ("dense", "conv", "sequence", "embedding", "recurrent", "io")
"""Grammar families: each draws its own kinds of trunk ops (``io`` stresses the inputs,
outputs, frozen parameters and selections around a dense trunk)."""


@st.composite
def specs(draw: Callable, family: str) -> Spec:
    """A small model spec of ``family``."""
    inp = first_input(draw, family)
    state = (inp[2],) if inp[0] == "ids" else inp
    scope = Scope(state, nn.ModuleDict())
    ops: list[Op] = []
    if inp[0] == "ids":
        ops.append(scope.push(("embed", inp[1], draw(st.sampled_from([2, 4, 6])), inp[3])))
    for _ in range(draw(st.integers(1 if family != "io" else 0, 4))):
        ops.append(draw(trunk_op(scope, family)))
    if family == "dense" and draw(st.integers(0, 2)) == 0:
        # a dense layer and the chain's last activation before the output layer: in trace mode
        # the structured method keeps its cotangents compact (RowsPairFactor, chain.compact_uses)
        ops.append(scope.push(linear_op(draw)))
        ops.append(scope.push(("act", draw(st.sampled_from(TAIL_ACTIVATIONS)))))
    flat = math.prod(scope.state)
    io = family == "io"
    output = draw(st.sampled_from(
        ["linear", "identity", "scalar", "multidim", "tuple", "dict"] if io else ["linear", "linear", "linear", "identity", "tuple"]
    ))
    inputs = draw(st.sampled_from(["tensor", "tuple", "dict"] if io or family == "embedding" else ["tensor"] * 5 + ["tuple"]))
    parametrized = inputs != "tensor" or any(True for _ in scope.mods.parameters())
    if output == "identity" and (flat > 12 or not parametrized):
        output = "linear"  # a head with parameters
    weights = draw(st.lists(st.integers(0, 63), max_size=3 if io else 1))
    params = draw(st.one_of(st.none(), st.lists(st.integers(0, 63), min_size=1, max_size=3).map(tuple))) if io or draw(st.integers(0, 5)) == 0 else None
    return Spec(
        family=family, input=inp, inputs=inputs, ops=tuple(ops), output=output, outputs=draw(st.integers(1, 3)),
        frozen=tuple(weights), params=params, train=draw(st.booleans()),
        n1=draw(st.integers(1, 5)), n2=draw(st.integers(1, 4)), seed=draw(st.integers(0, 2**16)),
    )
