"""The mismatch MoE adds: the rollout engine and the learner routing a token to different experts.

Mixture-of-experts layers (Qwen2-MoE, Qwen3-MoE, Mixtral) choose the top-k experts of each token from their
router's probabilities; the two engines compute those probabilities in their own kernels, so a token near a tie can
go to another expert set in each, and then its whole MLP output differs. Per MoE layer and overall:

    routing_flip_frac       the share of tokens whose selected expert sets differ (as sets: the order of the k
                            experts does not matter)
    router_prob_gap         the mean |p_engine - p_learner| over tokens and experts of the router's softmax

The positions compared are those whose router decisions shape the response: the last prompt token and every
response token but the last (the inputs of the positions that predict the response), as the learner's
full-sequence forward and the engine's decode both see them.
"""

from __future__ import annotations

import torch


def routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The top-k routers of a model's MoE layers, in layer order (transformers' `*TopKRouter` modules)."""
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]


class RoutingRecorder:
    """Records each router's logits and chosen experts while the model runs: `calls[i]` holds, for router i, one
    (logits [N, E] fp32, indices [N, k]) per forward, N the tokens of that forward in row-major order.

    A caller whose forwards do not run every row of its batch in order (the native engine's fast path: identical
    prompts prefilled once, finished rows dropped) appends to `sources`, for each forward, None (every row, in order)
    or a [rows] tensor: the row of that forward's batch holding each row, -1 where the row was not run. `by_row`
    gives the calls laid out as if every forward had run every row."""

    def __init__(self, model: torch.nn.Module):
        self.routers = routers(model)
        self.calls: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.routers]
        self.sources: list[torch.Tensor | None] = []
        self.handles = []

    def by_row(self, rows: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """`calls` with each forward's records for all `rows` rows in row order ([rows * S, E] and [rows * S, k]):
        a row that forward did not run gets logits 0 and expert 0."""
        out = []
        for per_router in self.calls:
            laid = []
            for f, (logits, idx) in enumerate(per_router):
                source = self.sources[f] if f < len(self.sources) else None
                if source is not None:
                    n = len(logits) // (int(source.max()) + 1)  # tokens per row of that forward
                    logits, idx = (_gather_rows(x, source.to(x.device), n) for x in (logits, idx))
                laid.append((logits, idx))
            out.append(laid)
        return out

    def __enter__(self) -> RoutingRecorder:
        for i, r in enumerate(self.routers):

            def hook(module, args, out, i=i):
                logits, _, indices = out
                self.calls[i].append((logits.detach().float(), indices.detach()))

            self.handles.append(r.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _gather_rows(x: torch.Tensor, source: torch.Tensor, per_row: int) -> torch.Tensor:
    """x [n * per_row, C] (n rows of a forward) -> [len(source) * per_row, C]: row i is x's row source[i], zeros
    where source[i] is -1."""
    rows = x.view(-1, per_row, x.shape[-1])[source.clamp(min=0)]
    return rows.masked_fill((source < 0)[:, None, None], 0).view(-1, x.shape[-1])


def flips(idx_a: torch.Tensor, idx_b: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Whether each token's expert set differs: idx [..., k] -> bool [...]."""

    def as_set(idx):
        return torch.zeros(*idx.shape[:-1], num_experts, dtype=torch.bool, device=idx.device).scatter_(-1, idx, True)

    return (as_set(idx_a) != as_set(idx_b)).any(-1)


class RoutingAccumulator:
    """`routing_metrics` over several batches."""

    def __init__(self) -> None:
        self.flip: list[torch.Tensor] = []
        self.gap: list[torch.Tensor] = []

    def add(self, logits_a, idx_a, logits_b, idx_b, mask) -> None:
        m = mask.bool()
        self.flip.append(flips(idx_a, idx_b, logits_a.shape[-1])[m].float())  # [N, L]
        self.gap.append((logits_a.softmax(-1) - logits_b.softmax(-1)).abs().mean(-1)[m].double())  # [N, L]

    def merge(self, others: list[RoutingAccumulator]) -> RoutingAccumulator:
        """This accumulator with what `others` (say, the other ranks') hold added."""
        for o in others:
            self.flip += o.flip
            self.gap += o.gap
        return self

    def result(self) -> dict[str, float]:
        return _summary(torch.cat(self.flip), torch.cat(self.gap))


def routing_metrics(
    logits_a: torch.Tensor, idx_a: torch.Tensor, logits_b: torch.Tensor, idx_b: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """Routing mismatch between two engines' router logits [B, T, L, E] and chosen experts [B, T, L, k] on the
    positions of `mask` [B, T]: overall and per layer (`routing_flip_frac/layer_<i>`, ...)."""
    acc = RoutingAccumulator()
    acc.add(logits_a, idx_a, logits_b, idx_b, mask)
    return acc.result()


def _summary(flip: torch.Tensor, gap: torch.Tensor) -> dict[str, float]:
    if not flip.numel():
        return {"routing_flip_frac": 0.0, "router_prob_gap": 0.0}
    out = {"routing_flip_frac": flip.mean().item(), "router_prob_gap": gap.mean().item()}
    for layer in range(flip.shape[1]):
        out[f"routing_flip_frac/layer_{layer}"] = flip[:, layer].mean().item()
        out[f"router_prob_gap/layer_{layer}"] = gap[:, layer].mean().item()
    return out


def prefill_experts(calls: list[list[tuple[torch.Tensor, torch.Tensor]]], rows: int) -> torch.Tensor:
    """The experts each router chose for every prompt position of a decode's prefill: [rows, P, L, k] (calls in
    row order: `RoutingRecorder.by_row`)."""
    return torch.stack([per_router[0][1].view(rows, -1, per_router[0][1].shape[-1]) for per_router in calls], 2)


def stack_decode(calls: list[list[tuple[torch.Tensor, torch.Tensor]]], rows: int, steps: int):
    """The engine's records of a decode (a prefill of [rows, P] tokens, then one token per row per step; calls in
    row order: `RoutingRecorder.by_row`) as (logits [rows, steps, L, E], indices [rows, steps, L, k]): position t
    is the router's decision on the token fed at step t (t = 0: the last prompt token)."""
    logits, indices = [], []
    for per_router in calls:
        first_logits, first_idx = per_router[0]
        lg = [first_logits.view(rows, -1, first_logits.shape[-1])[:, -1]]
        ix = [first_idx.view(rows, -1, first_idx.shape[-1])[:, -1]]
        for lo, i in per_router[1:steps]:  # one token per row: [rows, E] and [rows, k]
            lg.append(lo)
            ix.append(i)
        logits.append(torch.stack(lg, 1))
        indices.append(torch.stack(ix, 1))
    return torch.stack(logits, 2), torch.stack(indices, 2)


# ---- routing replay --------------------------------------------------------------------------------------------
def install_replay(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Let each router of `model` route with given experts (routing replay, R3): while a router's `replay_plan`
    ([N, k] for the N tokens of a forward; -1 where it chooses itself) is set, its chosen experts are the plan's,
    weighted by its own probabilities of them (renormalised as the router does), so gradients still reach the
    router. With no plan the router runs as before. Returns the routers."""
    found = routers(model)
    for r in found:
        if getattr(r, "replay_plan", "absent") != "absent":
            continue  # installed already
        r.replay_plan = None
        original = r.forward

        def forward(hidden_states, r=r, original=original):
            logits, scores, indices = original(hidden_states)
            plan = r.replay_plan
            if plan is None:
                return logits, scores, indices
            plan = plan.to(indices.device)
            chosen = torch.where(plan >= 0, plan, indices)
            weights = torch.softmax(logits.float(), dim=-1).gather(-1, chosen)
            if type(r).__name__.startswith("Mixtral") or getattr(r, "norm_topk_prob", False):
                weights = weights / weights.sum(dim=-1, keepdim=True)
            return logits, weights.to(scores.dtype), chosen

        r.forward = forward
    return found


def replay_rows(
    prefill_idx: torch.Tensor, decode_idx: torch.Tensor, prompt_lengths: list[int], lengths: list[int]
) -> list[torch.Tensor]:
    """Each row's experts per position in the learner's layout [prompt, response] ([n + len, L, k]): the prompt's
    from the engine's prefill (left-padded [rows, P, L, k]), the response tokens' from its decode steps
    (`decode_idx` [rows, T, L, k], position t = the token fed at step t), and -1 for the last response token, which
    the engine never fed."""
    P = prefill_idx.shape[1]
    out = []
    for i, (n, m) in enumerate(zip(prompt_lengths, lengths)):
        tail = torch.full((1, *decode_idx.shape[2:]), -1, dtype=decode_idx.dtype)
        out.append(torch.cat([prefill_idx[i, P - n :], decode_idx[i, 1:m], tail]) if m else prefill_idx[i, P - n :])
    return out
