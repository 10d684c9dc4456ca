"""The rules of ``WiringCheck`` (unregistered tensors, shuffling, output/target layouts, the loss's layout, framework
warnings): each reads what the callback captured and returns a finding."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_recipe.checks.wiring.probes import _CLASS_LOSSES, _ELEMENTWISE_LOSSES, _reference_loss
from lightning_recipe.findings import Finding
from lightning_recipe.functional.wiring import _broadcast_grows, _layout_verdict, _parse_size, shuffle_test

_UNREGISTERED_CAUSES = [
    "layers kept in a Python list or dict instead of `nn.ModuleList` / `nn.ModuleDict`: their weights are not "
    "parameters of the module, so the optimizer never updates them, checkpoints do not save them and `.to(device)` "
    "does not move them",
    "a tensor created with `requires_grad=True` inside `forward` (or kept as a plain tensor attribute): it is a new, "
    "untrained tensor at every step; make it an `nn.Parameter` in `__init__`",
    "a helper model kept out of the module on purpose (a frozen teacher) that still computes gradients: call "
    "`requires_grad_(False)` on it or run it under `torch.no_grad()`",
]

_SHUFFLE_CAUSES = [
    "`shuffle=False` on the train DataLoader of a dataset stored sorted by class (rows grouped by label, files "
    "read class by class)",
    "a sampler that returns the dataset in its stored order",
    "an iterable dataset that streams one class after another without a shuffle buffer",
]

_LAYOUT_CAUSES = [
    "`logits.view(-1, C)` on (N, C, H, W) outputs mixes pixels and classes: use `logits.permute(0, 2, 3, 1)"
    ".reshape(-1, C)`, or give the loss (N, C, H, W) and (N, H, W) directly",
    "time-major outputs (T, N, C) flattened against batch-major targets (N, T) (or the reverse): transpose one of "
    "them before flattening",
    "(N, 1) predictions against (N,) targets: the loss broadcasts them to (N, N); `squeeze(1)` the prediction or "
    "`unsqueeze(1)` the target",
]

_FRAMEWORK_CAUSES = {
    "no_loss": "`training_step` returns nothing (a missing `return loss`), so Lightning skips backward and no "
               "optimizer step ever updates the weights",
    "skipped": "the GradScaler skipped every optimizer step: the gradients are inf/NaN at every step (a NaN loss, an "
               "fp16 overflow in the model, a `log(0)`), so the weights never change",
    "no_step": "no optimizer step ever went through (an `optimizer_step` override that does not call the closure, "
               "or every step skipped)",
    "scheduler_order": "the learning-rate scheduler is stepped before the optimizer (`sch.step()` before `opt.step()` "
                       "in manual optimization): the first value of the schedule is skipped, and a scheduler stepped "
                       "by hand as well as by Lightning runs twice as fast",
    "no_optimizer": "`configure_optimizers` returns nothing, so the fit runs without an optimizer and trains nothing",
}


class _WiringRules:
    """The judgements of :class:`~lightning_recipe.WiringCheck`, mixed into it (they read its state)."""

    def _unregistered(self, step: int) -> Finding:
        check = f"{self.name}.unregistered"
        g = self._graph
        if g is not None and "error" in g:
            return Finding(check, "skip", f"{check}: the autograd graph of the first loss could not be walked: "
                           f"{g['error']}.")
        if g is None:
            return Finding(check, "skip", f"{check}: no backward ran in the first {self._seen} batch(es) ("
                           "training_step returned no loss, or manual optimization without `manual_backward`): "
                           "nothing to walk.")
        notes = "".join(f" Note: {n}" for n in g["notes"])
        details = {k: g[k] for k in ("nodes", "leaves", "parameters", "hidden", "in_optimizer")}
        hidden, held = g["hidden"], g["in_optimizer"]
        if hidden:
            return Finding(check, "fail", f"{check}: {len(hidden)} tensor(s) that require a gradient take part in the "
                           f"first training loss but are not parameters of the LightningModule, so the optimizer "
                           f"never updates them: {_names(hidden)} (expected: every trainable tensor is registered, "
                           f"as an `nn.Parameter` or inside an `nn.Module` child). HINT: use `nn.ModuleList` / "
                           f"`nn.ModuleDict` for lists of layers and `nn.Parameter` created in `__init__` for learned "
                           f"tensors.{notes}", float(len(hidden)), 0.0, step, list(_UNREGISTERED_CAUSES), details)
        if held:
            return Finding(check, "warn", f"{check}: {len(held)} tensor(s) in the first training loss are held by the "
                           f"optimizer but are not parameters of the LightningModule: {_names(held)}. They are "
                           "trained, but `state_dict()` and checkpoints leave them out and `.to(device)` does not "
                           "move them. "
                           f"HINT: register them (`nn.ModuleList`, `nn.ModuleDict`, `nn.Parameter`).{notes}",
                           float(len(held)), 0.0, step, list(_UNREGISTERED_CAUSES[:1]), details)
        trunc = " (walk stopped at `max_graph_nodes`: part of the graph was not seen)" if g["truncated"] else ""
        return Finding(check, "pass", f"{check}: every leaf tensor that requires a gradient in the first training loss "
                       f"is a parameter of the LightningModule ({g['parameters']} parameters reached, {g['nodes']} "
                       f"autograd nodes walked{trunc}).{notes}", 0.0, 0.0, step, [], details)

    # shuffle

    def _shuffle(self, step: int) -> Finding:
        check = f"{self.name}.shuffle"
        plan = self._shuffle_plan
        if "skip" in plan:
            return Finding(check, "skip", f"{check}: not judged: {plan['skip']}.")
        if self._counts is None:
            return Finding(check, "skip", f"{check}: no batch with one class label per example was seen.")
        per_batch = self._counts[: min(self._seen, self.batches)].cpu()[:, :-1]  # the read (ignored labels dropped)
        res = shuffle_test(per_batch, torch.tensor(plan["counts"], dtype=torch.float64))
        details = {k: res[k] for k in ("distinct", "expected_distinct", "p_all_single", "z", "batch_sizes")}
        details["order"] = plan["order"]
        numbers = (f"distinct classes in the first {len(res['distinct'])} batches: {res['distinct']} (mean "
                   f"{res['mean_distinct']:.3g}); a random order of the same labels gives {res['mean_expected']:.3g} "
                   f"on average (sum_c 1 - C(N - n_c, B) / C(N, B), N={int(res['n'])}, {plan['classes']} classes)")
        if not res["sorted"]:
            return Finding(check, "pass", f"{check}: batches are as mixed as a random order; {numbers}; order: "
                           f"{plan['order']}.", res["mean_distinct"], res["mean_expected"], step, [], details)
        if res["all_single"]:
            what = (f"every one of the first {len(res['distinct'])} batches holds a single class (a random order gives "
                    f"that with probability {res['p_all_single']:.2g})")
        else:
            what = (f"the batches hold far fewer classes than a random order gives ({res['z']:.1f} standard deviations "
                    "below)")
        if plan["judge"] == "custom":
            return Finding(check, "pass", f"{check}: {what}; {numbers}. Order: {plan['order']}. Note: a custom batch "
                           "sampler (e.g. class-balanced P x K batches) may do this on purpose, so it is not judged.",
                           res["mean_distinct"], res["mean_expected"], step, [], details)
        if plan["judge"] == "random":  # cannot come from a random order (probability below the threshold)
            return Finding(check, "warn", f"{check}: {what} although the loader samples at random ({plan['order']}); "
                           f"{numbers}.", res["mean_distinct"], res["mean_expected"], step, list(_SHUFFLE_CAUSES),
                           details)
        return Finding(check, "fail", f"{check}: the training batches are sorted by class: {what}; {numbers}. Order: "
                       f"{plan['order']}. Each step then pushes the model toward one class and the next undoes it. "
                       "HINT: `DataLoader(..., shuffle=True)` or a sampler (`RandomSampler`, "
                       "`WeightedRandomSampler`).", res["mean_distinct"], res["mean_expected"], step,
                       list(_SHUFFLE_CAUSES), details)

    # loss layout

    def _judge_layout(self, step0: dict[str, Any], step: int) -> Finding:
        check = f"{self.name}.loss_layout"
        if "why" in step0:
            return Finding(check, "skip", f"{check}: not judged: {step0['why']}.")
        if not step0:
            return Finding(check, "skip", f"{check}: the first batch was not seen.")
        name = step0["loss_name"]
        if not step0["outputs"]:
            return Finding(check, "skip", f"{check}: not judged: the model's forward was not called through "
                           "`self(...)` in the first training_step (or ran without gradients).")
        if not step0["calls"]:
            return Finding(check, "skip", f"{check}: not judged: the loss module ({name}) was not called in the first "
                           "training_step.")
        if name not in _CLASS_LOSSES + _ELEMENTWISE_LOSSES:
            return Finding(check, "skip", f"{check}: not judged: {name} is not a loss whose layout is known.")
        y = step0["targets"]
        notes: list[str] = []
        if step0["fed"] is False:
            notes.append("the model's input was not the batch's input (augmented or mixed in training_step), so "
                         "the pairing with the batch's targets is not compared")
        verdicts = [_layout_verdict(inp, tgt, step0["outputs"], y, name in _CLASS_LOSSES, step0["fed"] is not False)
                    for inp, tgt, _ in step0["calls"]]
        bad = [(v, call) for v, call in zip(verdicts, step0["calls"]) if v["status"] == "fail"]
        judged = [v for v in verdicts if v["status"] == "pass"]
        notes += sorted({v["why"] for v in verdicts if v["status"] == "skip"})
        details: dict[str, Any] = {"loss": name, "verdicts": [v["what"] for v in verdicts]}
        if bad:
            v, (_, _, value) = bad[0]
            module_value = float(value.float().mean()) if isinstance(value, Tensor) else float("nan")
            ref = _reference_loss(step0["loss_module"], v.get("reference"))
            details.update({"training_step_loss": self._first_loss, "loss_module_value": module_value,
                            "model_layout_loss": ref})
            numbers = (f"training_step's first loss: {_fmt(self._first_loss)} (the {name} call: "
                       f"{_fmt(module_value)}); the same {name} on the model's own layout ({v.get('layout', '?')}): "
                       f"{_fmt(ref)}")
            return Finding(check, "fail", f"{check}: the loss is computed on another layout than the model's output: "
                           f"{v['what']}. {numbers}. (The comparison is exact, on the output tensor of the same step: "
                           "dropout and batch statistics do not enter it.)" + "".join(f" Note: {n}." for n in notes),
                           self._first_loss, ref, step, list(_LAYOUT_CAUSES), details)
        if judged:
            return Finding(check, "pass", f"{check}: {name} received the model's output in its own layout "
                           f"({judged[0]['what']})." + "".join(f" Note: {n}." for n in notes), self._first_loss, None,
                           step, [], details)
        return Finding(check, "skip", f"{check}: not judged: " + "; ".join(notes) + ".", details=details)

    def _loss_layout(self, step: int) -> Finding:
        finding = self._layout or Finding(f"{self.name}.loss_layout", "skip", f"{self.name}.loss_layout: the first "
                                          "training step was not seen.")
        tap = self.__dict__.get("_tap")
        for rec in (tap.records if tap is not None else []):
            if rec["key"] != "broadcast" or "broadcast" in self._reported:
                continue
            self._reported.add("broadcast")
            tgt, inp = _parse_size(rec["groups"][0]), _parse_size(rec["groups"][1])
            grows = _broadcast_grows(inp, tgt)
            msg = (f"PyTorch warned during training: \"{rec['message'][:160]}\" ({rec['where']})")
            if grows:
                new = Finding(finding.check, "fail", f"{finding.check}: a loss broadcast its input {inp} against its "
                              f"target {tgt} to a larger shape: every prediction is compared with every target. "
                              f"{msg}.", finding.measured, finding.expected, step, list(_LAYOUT_CAUSES[2:]),
                              {**finding.details, "broadcast": [inp, tgt]})
                if finding.failed:
                    finding.message += "\n" + new.message
                else:
                    finding = new
            else:
                finding.message += f" Note: {msg}; the broadcast does not enlarge the loss (a scalar target?)."
        return finding

    # framework warnings and optimizer steps

    def _framework(self, trainer: "pl.Trainer", late: bool = False) -> Optional[Finding]:
        check = f"{self.name}.framework"
        tap = self.__dict__.get("_tap")
        records = [r for r in (tap.records if tap is not None else []) if r["key"] != "broadcast"]
        new = [r for r in records if r["key"] not in self._reported]
        for r in new:
            self._reported.add(r["key"])
        attempted = trainer.global_step - self._start_step
        real = self._steps[0]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        fails, warns, notes = [], [], []
        causes: list[str] = []
        automatic = trainer.lightning_module.automatic_optimization
        if not late and automatic and self._seen > 0 and self._no_loss == self._seen:
            fails.append(f"`training_step` returned no loss at every one of the first {self._seen} batch(es), so no "
                         "backward ran and no weight changed")
            causes.append(_FRAMEWORK_CAUSES["no_loss"])
            self._reported.add("no_loss")
        elif not late and automatic and self._no_loss:
            notes.append(f"training_step returned no loss at {self._no_loss} of the first {self._seen} batches "
                         "(skipped on purpose?)")
        if (real == 0 and attempted >= 8 and self._hooked and "no_step" not in self._reported
                and self._no_loss < self._seen):
            scale = float(scaler.get_scale()) if scaler is not None else None
            if scaler is not None and scale is not None and scale <= 256:
                fails.append(f"the GradScaler skipped all {attempted} optimizer steps (non-finite gradients at every "
                             f"step; the loss scale fell to {scale:g})")
                causes.append(_FRAMEWORK_CAUSES["skipped"])
                self._reported.add("no_step")
            elif late:
                fails.append(f"none of the {attempted} optimizer steps of the fit updated the weights (no step hook of "
                             "the optimizers ever ran)")
                causes.append(_FRAMEWORK_CAUSES["skipped" if scaler is not None else "no_step"])
                self._reported.add("no_step")
        skipped_some = scaler is not None and real < attempted
        for r in new:
            text = f"\"{r['message'][:160]}\" ({r['where']})"
            if r["key"] == "scheduler_order":
                if skipped_some:
                    notes.append(f"torch warned {text}; a GradScaler skipped {attempted - real} step(s), which causes "
                                 "this warning: harmless when only the first steps were skipped")
                else:
                    warns.append(f"the learning-rate scheduler was stepped before its optimizer: torch warned {text}")
                    causes.append(_FRAMEWORK_CAUSES["scheduler_order"])
            elif r["key"] == "no_optimizer":
                warns.append(f"the fit has no optimizer: Lightning warned {text}")
                causes.append(_FRAMEWORK_CAUSES["no_optimizer"])
            elif r["key"] == "no_loss" and not fails:
                notes.append(f"Lightning warned {text}")
        note = "".join(f" Note: {n}." for n in notes)
        details = {"optimizer_steps": attempted, "steps_applied": real, "batches_without_loss": self._no_loss,
                   "warnings": [r["message"][:200] for r in records]}
        if fails:
            return Finding(check, "fail", f"{check}: " + "; ".join(fails + warns) + ". HINT: return the loss from "
                           "training_step; check the loss for NaN/Inf; step schedulers only through "
                           f"`configure_optimizers`.{note}", float(real), float(attempted), trainer.global_step,
                           causes, details)
        if warns:
            return Finding(check, "warn", f"{check}: " + "; ".join(warns) + f".{note}", float(real), float(attempted),
                           trainer.global_step, causes, details)
        if late and not notes:
            return None
        return Finding(check, "pass", f"{check}: no framework warning that means a bug; {real} of {attempted} "
                       f"optimizer step(s) applied.{note}", float(real), float(attempted), trainer.global_step, [],
                       details)


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def _names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
