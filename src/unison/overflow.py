"""FP16 activation overflow: found in the forward pass of either engine, named by layer, never silently sampled from.

FP16 holds |x| <= 65504. A weight update can push a layer's activations past that; the value becomes inf, the
next operation turns it into NaN, and the sampler (or the loss) reads garbage. Gradient overflow is the loss
scaler's business (`unison.precision.backward_and_step`); this module watches the forward.

`OverflowGuard` puts hooks on the linear layers, which both engines call as modules whatever they fuse around them
(the learner's Hugging Face forward, and the native engine's decode with its fused norms and MLP):

    residual after layer i's attention   input of layers[i].mlp.gate_proj (the normed residual)
    residual after layer i's MLP         input of layers[i+1].self_attn.q_proj, or of the final norm (the last layer)
    the final norm                       input of the LM head
    the LM head                          its output: the logits (a tied head's products can leave fp16's range)
    (fp32_layers) layer i's MLP hidden   input of layers[i].mlp.down_proj, and its output (to replace it)

A non-finite residual stays non-finite through the norm (RMSNorm of inf is NaN), so these checks name the first
block whose values left the FP16 range. Each check is one `isfinite().all()` reduction kept on the device; they are
read in a hook on the LM head's output (one host sync per forward, before any token is sampled or any loss
formed); checks of a pass that does not reach the head are read with the next pass that does. On overflow:

    stop         raise `ActivationOverflowError` naming the layer and the block, with the cures that work for that
                 block: bf16 or fp32 for all; fp32_layers for an MLP; an fp32 LM head for the logits
    fp32_layers  an MLP whose hidden activation overflows is recomputed in fp32 from its saved input (its weights
                 upcast on the fly in that engine's compute copy, the input cast up, the output cast back), and
                 the recomputed output replaces the overflowed one; where the engine calls the MLP as a module it
                 runs in fp32 from then on. This checks each MLP hidden at once (one sync per MLP call). Overflow
                 that fp32 cannot cure (attention, the residual stream, or an MLP whose fp32 output is still beyond
                 65504) stops the run.
    off          no hooks

`activation_stats` is the measuring variant used by `unison probe --activations`: the largest |activation| per
layer and block of an fp32 forward, against the FP16 limit.
"""

from __future__ import annotations

import math
import sys

import torch

from unison.architecture import decoder_parts
from unison.errors import UserError
from unison.precision import FP16_MAX

MODES = ("stop", "fp32_layers", "off")
# where a check point sits, in words, by its block
SITES = {
    "attention": lambda i: f"layer {i} (attention block, model.layers.{i})",
    "mlp": lambda i: f"layer {i} (MLP block, model.layers.{i})",
    "norm": lambda i: "the final norm (model.norm, after the last layer)",
    "head": lambda i: "the LM head (its logits)",
}


class ActivationOverflowError(RuntimeError):
    """An activation left the FP16 range in a forward pass."""


def _first_tensor(args) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    return None


class OverflowGuard:
    """Catches FP16 activation overflow in one model's forward passes (one engine's compute copy), at named check
    points that the engine's forward passes in order:

        attention_input(i, x)  the normed residual entering layer i's attention (for i > 0: layer i-1's MLP output)
        mlp_input(i, x)        the normed residual entering layer i's MLP (layer i's attention output)
        final_residual(x)      the residual after the last layer, entering the final norm
        head_input(x)          the final norm's output, entering the LM head
        head_output(logits)    the LM head's output; then the checks are read (one sync)
        mlp_as_module(i)       whether layer i's MLP must run as the model's module (fp32_layers: its hooks recompute
                               or replace its output)

    A model's own forward (the learner's, the native engine's fallback) passes them through hooks on its modules
    (`hooks="all"`); an engine that fuses its own forward calls them itself (`hooks="mlp"`: only the MLPs' hooks of
    fp32_layers, which run where the engine calls the MLP as a module)."""

    def __init__(self, model: torch.nn.Module, mode: str = "stop", where: str = "model", hooks: str = "all"):
        if mode not in MODES:
            raise UserError(f"unknown activation-overflow mode {mode!r}; choose one of: {', '.join(MODES)}")
        self.model, self.mode, self.where = model, mode, where
        self.flags: list[torch.Tensor] = []
        self.labels: list[tuple[int, str]] = []
        self.upcast: list[int] = []  # layers whose MLP runs in fp32, in the order they were switched
        self.handles = []
        self._busy = False
        self.saved: dict[int, torch.Tensor] = {}  # fp32_layers: each MLP's input, for a recompute
        self.cured: dict[int, torch.Tensor] = {}  # fp32_layers: the recomputed output replacing an overflowed one
        self.layers = []
        parts = decoder_parts(model)
        if mode == "off" or parts is None:
            return
        inner, layers, norm = parts
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        mlps = [getattr(layer.mlp, n, None) for layer in layers for n in ("gate_proj", "down_proj")]
        if head is None or not hasattr(inner, "embed_tokens") or any(m is None for m in mlps):
            return
        self.layers = layers
        self._hook(layers, norm, head, hooks)

    def _hook(self, layers: list, norm: torch.nn.Module, head: torch.nn.Module, hooks: str) -> None:
        add = self.handles.append
        for i, layer in enumerate(layers):
            if self.mode == "fp32_layers":  # in stop mode an overflowed MLP shows in the residual after it
                add(layer.mlp.down_proj.register_forward_pre_hook(self._hidden(i)))
                add(layer.mlp.down_proj.register_forward_hook(self._output(i)))
            if hooks != "all":
                continue
            if i:
                add(layer.self_attn.q_proj.register_forward_pre_hook(self._point(self.attention_input, i)))
            add(layer.mlp.gate_proj.register_forward_pre_hook(self._point(self.mlp_input, i)))
        if hooks == "all":
            add(norm.register_forward_pre_hook(self._point(self.final_residual)))
            add(head.register_forward_pre_hook(self._point(self.head_input)))
            add(head.register_forward_hook(self._head_hook))

    @classmethod
    def attach(cls, model, mode: str, where: str, hooks: str = "all") -> OverflowGuard | None:
        """A guard on `model` when its weights are fp16 (bf16 and fp32 hold 3e38) and `mode` is not off."""
        first = next(model.parameters(), None)
        if mode == "off" or first is None or first.dtype != torch.float16:
            return None
        return cls(model, mode, where, hooks)

    # ---- check points ---------------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return bool(self.layers)

    def attention_input(self, layer: int, x: torch.Tensor) -> None:
        if layer and self.active and not self._busy:
            self._flag(x, layer - 1, "mlp")

    def mlp_input(self, layer: int, x: torch.Tensor) -> None:
        if not self.active or self._busy:
            return
        self._flag(x, layer, "attention")
        if self.mode == "fp32_layers":
            self.saved[layer] = x

    def final_residual(self, x: torch.Tensor) -> None:
        """The residual stream after the last layer (its MLP block's output added)."""
        if self.active and not self._busy:
            self._flag(x, len(self.layers) - 1, "mlp")

    def head_input(self, x: torch.Tensor) -> None:
        """The final norm's output."""
        if self.active and not self._busy:
            self._flag(x, len(self.layers) - 1, "norm")

    def head_output(self, logits: torch.Tensor, fp32_head: bool = False) -> None:
        """The logits (an fp32 LM head's cannot overflow), then one sync for all the checks of this forward."""
        if not self.active or self._busy:
            return
        if not fp32_head:
            self._flag(logits, len(self.layers) - 1, "head")
        self._check()

    def mlp_as_module(self, layer: int) -> bool:
        return self.active and self.mode == "fp32_layers"

    # ---- hooks ----------------------------------------------------------------------------------------------
    def _head_hook(self, module, args, out):
        if isinstance(out, torch.Tensor):
            self.head_output(out, fp32_head=module.weight.dtype == torch.float32)
        return None

    def _flag(self, x, layer: int, block: str):
        self.flags.append(torch.isfinite(x).all())
        self.labels.append((layer, block))

    @staticmethod
    def _point(check, *layer):
        def hook(module, args):
            x = _first_tensor(args)
            if x is not None:
                check(*layer, x)

        return hook

    def _hidden(self, layer: int):
        def hook(module, args):
            h = _first_tensor(args)
            if h is None or self._busy:
                return
            if self.mode != "fp32_layers":
                self._flag(h, layer, "mlp")
                return
            if bool(torch.isfinite(h).all()) or layer not in self.saved:
                return
            self._check()  # the block before (this layer's attention, say) may have overflowed first: named so
            self.cured[layer] = self._recompute(layer)

        return hook

    def _output(self, layer: int):
        def hook(module, args, output):
            if self._busy:
                return None
            if layer in self.cured:
                return self.cured.pop(layer)
            self._flag(output, layer, "mlp")
            return None

        return hook

    def _recompute(self, layer: int) -> torch.Tensor:
        """fp32_layers: the MLP of `layer` in fp32 from its saved input, rounded back; stops if still out of range."""
        mlp = self.layers[layer].mlp
        if layer not in self.upcast:
            run_in_fp32(mlp)
            self.upcast.append(layer)
            print(
                f"unison: layer {layer}'s MLP overflowed fp16 in the {self.where}; it runs in fp32 from now on",
                file=sys.stderr,
                flush=True,
            )
        x = self.saved.pop(layer)
        self._busy = True
        try:
            out = mlp(x)
        finally:
            self._busy = False
        if not bool(torch.isfinite(out).all()):
            raise ActivationOverflowError(self.message(layer, "mlp", fp32_failed=True))
        return out

    def _check(self) -> None:
        if not self.flags:
            return
        ok = torch.stack(self.flags)
        labels = list(self.labels)
        self.flags.clear()
        self.labels.clear()
        if bool(ok.all()):
            return
        layer, block = labels[int((~ok).nonzero()[0, 0])]
        raise ActivationOverflowError(self.message(layer, block))

    def message(self, layer: int, block: str, fp32_failed: bool = False) -> str:
        """The one line of an overflow: where (the engine, the layer and block), and the cures that work there."""
        site = SITES[block](layer)
        head = f"activations left the FP16 range (|x| > {FP16_MAX:g}, or inf/NaN) in the {self.where} at {site}"
        whole = "run this model in bf16 or fp32 (e.g. --precision bf16)"
        if fp32_failed:
            return f"{head}, and its output stays beyond the FP16 range even computed in fp32; {whole}"
        if block == "mlp" and self.mode == "fp32_layers" and layer in self.upcast:
            return f"{head}, after its MLP was already moved to fp32 (the residual stream overflows); {whole}"
        if block == "head":
            return f"{head}; set precision.lm_head=fp32 (the LM head and its logits in fp32), or {whole}"
        if block == "mlp" and self.mode != "fp32_layers":
            return (
                f"{head}; {whole}, or set precision.on_activation_overflow=fp32_layers to compute overflowing MLPs in "
                "fp32"
            )
        if block == "mlp":
            return f"{head}; fp32 layers cannot cure overflow in the residual stream: {whole}"
        return (
            f"{head}; {whole}: precision.on_activation_overflow=fp32_layers computes only MLPs in fp32 and "
            f"cannot cure overflow in {'an attention block' if block == 'attention' else 'the final norm'}"
        )

    # ---- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"upcast": list(self.upcast)}

    def load_state_dict(self, state: dict) -> None:
        for layer in state.get("upcast", []):
            if layer not in self.upcast:
                run_in_fp32(self.layers[layer].mlp)
                self.upcast.append(layer)


def run_in_fp32(module: torch.nn.Module) -> None:
    """From now on compute `module` in fp32: its parameters upcast on each call (the stored copy keeps its dtype,
    so checksums, weight sync and master weights are untouched, and gradients flow back to it), floating inputs
    cast up, the output cast back to the input dtype."""
    if getattr(module, "_unison_fp32", False):
        return
    inner_call = [False]

    def forward(*args, **kwargs):
        if inner_call[0]:
            return type(module).forward(module, *args, **kwargs)
        x = _first_tensor(args)
        dtype = x.dtype if x is not None else torch.float32
        params = {n: p.float() for n, p in module.named_parameters()}
        args32 = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        inner_call[0] = True
        try:
            out = torch.func.functional_call(module, params, args32, kwargs)
        finally:
            inner_call[0] = False
        return out.to(dtype)

    module.forward = forward
    module._unison_fp32 = True


# ---- measuring (unison probe --activations) -----------------------------------------------------------------
BLOCKS = ("residual", "attention", "mlp_hidden", "mlp_out")


@torch.no_grad()
def activation_stats(model: torch.nn.Module, batches: list[torch.Tensor]) -> list[dict]:
    """Largest |activation| per decoder layer and block over full-sequence forwards of `batches` ([B, L] ids).

    residual: the residual stream after the layer's attention and after its MLP; attention: the q/k/v/o projection
    outputs; mlp_hidden: the MLP's inner activation (the down projection's input); mlp_out: the MLP's output.
    Run it on an fp32 copy so that values beyond 65504 are measured, not clipped to inf.
    """
    parts = decoder_parts(model)
    if parts is None:
        return []
    inner, layers, norm = parts
    peak = [dict.fromkeys(BLOCKS, 0.0) for _ in layers]
    handles = []

    def record(i, block, pre):
        def hook(module, *hook_args):
            x = _first_tensor(hook_args[0]) if pre else hook_args[1]
            x = x[0] if isinstance(x, tuple) else x
            if isinstance(x, torch.Tensor) and x.numel():
                v = float(x.detach().abs().float().max().nan_to_num(nan=float("inf")))
                peak[i][block] = max(peak[i][block], v)

        return hook

    for i, layer in enumerate(layers):
        # the residual after attention enters the MLP's norm: post_attention_layernorm in Llama-style layers; in
        # Gemma-style ones that norm scales the attention output, and pre_feedforward_layernorm takes the residual
        mid = getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm
        handles.append(mid.register_forward_pre_hook(record(i, "residual", True)))
        after = layers[i + 1].input_layernorm if i + 1 < len(layers) else norm
        handles.append(after.register_forward_pre_hook(record(i, "residual", True)))
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            proj = getattr(layer.self_attn, name, None)
            if proj is not None:
                handles.append(proj.register_forward_hook(record(i, "attention", False)))
        down = getattr(layer.mlp, "down_proj", None)
        if down is not None:
            handles.append(down.register_forward_pre_hook(record(i, "mlp_hidden", True)))
        handles.append(layer.mlp.register_forward_hook(record(i, "mlp_out", False)))
    try:
        for ids in batches:
            inner(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for i, p in enumerate(peak):
        block = max(p, key=p.get)
        rows.append(
            {
                "layer": i,
                **p,
                "max_abs": p[block],
                "where": block,
                "fp16_fraction": p[block] / FP16_MAX,
                "fp16_safe": p[block] <= FP16_MAX,
            }
        )
    return rows


HEADROOM_MIN = 4.0  # activations within 4x of 65504 leave too little room for longer responses and other prompts
SAMPLE_MIN_TOKENS = 1024  # fewer tokens measured say little about the largest activation of a run


def headroom_verdict(rows: list[dict], tokens: int | None = None) -> str:
    """The largest |activation| against fp16's limit in words: past it, within HEADROOM_MIN of it (with the cure
    that works for its block), or fitting; and, where `tokens` is below SAMPLE_MIN_TOKENS, that the sample is too
    short to rely on."""
    worst = max(rows, key=lambda r: r["max_abs"])
    where = f"at layer {worst['layer']} ({worst['where']})"
    room = FP16_MAX / worst["max_abs"] if worst["max_abs"] else math.inf
    cure = (
        f"keep layer {worst['layer']}'s MLP in fp32 (precision.on_activation_overflow=fp32_layers) or run it in bf16"
        if worst["where"] == "mlp_hidden"
        else "run it in bf16 (fp32 layers compute only MLPs in fp32 and cannot keep it in range)"
    )
    if not worst["fp16_safe"]:
        verdict = f"exceeds FP16: {cure}"
    elif room < HEADROOM_MIN:
        verdict = (
            f"within {room:.2g}x of the FP16 limit, under the {HEADROOM_MIN:g}x margin: longer responses and other "
            f"prompts can overflow; {cure}"
        )
    else:
        verdict = f"fits FP16 ({room:.3g}x headroom)"
    text = f"largest |activation| {worst['max_abs']:.4g} {where}: {verdict}"
    if tokens is not None and tokens < SAMPLE_MIN_TOKENS:
        text += (
            f"; warning: measured on {tokens} tokens only (fewer than {SAMPLE_MIN_TOKENS}), too few to rely on: "
            "probe more prompts and longer responses (--num-prompts, --max-new-tokens)"
        )
    return text


def format_activation_table(rows: list[dict], tokens: int | None = None) -> str:
    """One line per layer: the largest |activation| of each block and its share of the FP16 limit 65504; then the
    verdict (`headroom_verdict`) on `tokens` measured."""
    head = f"{'layer':>5s}" + "".join(f"{b:>12s}" for b in BLOCKS) + f"{'max/65504':>11s}  fp16"
    lines = [head, "-" * len(head)]
    for r in rows:
        near = r["fp16_safe"] and r["fp16_fraction"] > 1 / HEADROOM_MIN
        lines.append(
            f"{r['layer']:>5d}"
            + "".join(f"{r[b]:>12.4g}" for b in BLOCKS)
            + f"{r['fp16_fraction']:>11.2e}  {'OVERFLOW' if not r['fp16_safe'] else 'near' if near else 'ok'}"
        )
    if rows:
        lines.append(headroom_verdict(rows, tokens))
    return "\n".join(lines)
