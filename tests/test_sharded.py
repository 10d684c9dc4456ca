"""Strategies that shard the model: FSDP on CPU (2 processes, gloo), DeepSpeed and ModelParallel by stand-ins.

Lightning 2.6.6 refuses ``FSDPStrategy`` without a GPU (``accelerator_connector``: "requires a GPU accelerator" for the
``FSDPStrategy`` class itself, not a subclass), and torch's FSDP needs ``device_id=torch.device("cpu")`` to run on CPU
(Lightning passes ``root_device.index``, ``None`` on CPU). The stand-in :class:`CPUFSDP` wraps the model with that
device itself (Lightning keeps a model already wrapped), and spawns its workers (``ddp_spawn``'s launcher) instead of
re-running the test script. Under it, each rank holds a shard of every parameter (the head's bias is empty on rank 0,
whole on rank 1 for the tiny model): the fit must complete with every check passing or skipping, no RecipeWarning,
and the head bias set to the global log-prior on both ranks.

DeepSpeed is not installed here: the checks recognise it by the strategy's class name, so a single-device strategy
named ``DeepSpeedStrategy`` (with a DeepSpeed ``config``) stands in for it, and one named ``ModelParallelStrategy``.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Optional

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy
from lightning.pytorch.strategies import ModelParallelStrategy as LightningModelParallel
from lightning.pytorch.strategies.launchers.multiprocessing import _WorkerOutput

from helpers import SpawnLauncher, TinyModel, blobs, loader, trainer
from lightning_recipe import recommended
from lightning_recipe._core.dtypes import wide, wide_dtype
from lightning_recipe._core.sharding import full_tensor, local_tensor, sharding, sharding_skip, zero_stage
from lightning_recipe.exceptions import RecipeWarning
from lightning_recipe.findings import _finding, collect_findings

PRIORS = [0.6, 0.2, 0.1, 0.1]
N_TRAIN = 448  # 14 steps of 16 per rank and epoch


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    return blobs(n=N_TRAIN + 128, priors=PRIORS, seed=0)


class _Launcher(SpawnLauncher):
    """:class:`SpawnLauncher` without sending the weights back (torch's full FSDP state dict crashes on CPU)."""

    def _collect_rank_zero_results(self, trainer: Any, results: Any) -> Optional[_WorkerOutput]:
        if self._strategy.local_rank != 0:
            return None
        return _WorkerOutput(None, None, trainer.state, results, self.get_extra_results(trainer))


class CPUFSDP(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` on CPU (see the module docstring)."""

    def _configure_launcher(self) -> None:
        self._launcher = _Launcher(self, start_method="spawn")

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        model = FSDP(model, device_id=torch.device("cpu"), sharding_strategy=self.sharding_strategy,
                     use_orig_params=True)
        return super()._setup_model(model)


class ShardModel(TinyModel):
    def train_dataloader(self) -> Any:
        x, y = _data()
        return loader(x[:N_TRAIN], y[:N_TRAIN], batch_size=16, shuffle=True)

    def val_dataloader(self) -> Any:
        x, y = _data()
        return loader(x[N_TRAIN:], y[N_TRAIN:], batch_size=64, shuffle=False)


class Probe(Callback):
    """Per rank: the head bias (full, through FSDP) after the recipe's ``on_train_start``, the shard size, the
    warnings of the fit."""

    def __init__(self, out: str) -> None:
        self.out = out

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.warned: list[str] = []
        show = warnings.showwarning

        def record(message: Any, category: Any, *args: Any, **kwargs: Any) -> Any:
            self.warned.append(f"{category.__name__}: {message}")
            return show(message, category, *args, **kwargs)

        warnings.showwarning = record

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        bias = pl_module.net[-1].bias
        shard = local_tensor(bias).numel()
        if isinstance(trainer.model, FSDP):
            with FSDP.summon_full_params(trainer.model):
                full = pl_module.net[-1].bias.detach().tolist()
        else:  # a DTensor (ModelParallelStrategy)
            full = full_tensor(bias.detach()).tolist()
        self._dump(trainer, {"bias": full, "shard": shard, "wrapper": type(trainer.model).__name__,
                             "type": type(bias).__name__})

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._dump(trainer, {"warnings": [w for w in self.warned if w.startswith("RecipeWarning")]}, "end")

    def _dump(self, trainer: Any, obj: dict, tag: str = "start") -> None:
        with open(os.path.join(self.out, f"{tag}{trainer.global_rank}.json"), "w") as f:
            json.dump(obj, f)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_fsdp_cpu_recommended_healthy(tmp_path: Any) -> None:
    t = L.Trainer(
        strategy=CPUFSDP(), accelerator="cpu", devices=2, max_epochs=1, callbacks=[*recommended(), Probe(str(tmp_path))],
        default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    L.seed_everything(0)
    t.fit(ShardModel())
    counts = torch.bincount(_data()[1][:N_TRAIN], minlength=4).double()
    prior = torch.log(counts / counts.sum()).tolist()
    starts = [json.load(open(os.path.join(tmp_path, f"start{r}.json"))) for r in (0, 1)]
    assert {s["wrapper"] for s in starts} == {"FullyShardedDataParallel"}
    assert sorted(s["shard"] for s in starts) == [0, 4]  # the bias is sharded: all on one rank, none on the other
    for s in starts:  # written through summon_full_params(writeback=True): the global prior on every rank
        assert s["bias"] == pytest.approx(prior, abs=1e-5)
    for r in (0, 1):
        assert json.load(open(os.path.join(tmp_path, f"end{r}.json")))["warnings"] == []
    report = json.load(open(os.path.join(tmp_path, "recipe", "report.json")))  # rank zero's findings
    found = {f["check"]: _finding(f) for f in report["findings"]}
    statuses = {f.status for f in found.values()}
    assert statuses <= {"pass", "skip", "note"}, [(f.check, f.status, f.message) for f in found.values()
                                                   if f.status not in ("pass", "skip", "note")]
    # the checks that read every parameter see the whole model, not one rank's shard
    for name in ("HeadBiasInit", "InitialLossCheck", "ParameterUpdateCheck", "ParameterUpdateCheck.zero_grad",
                 "WiringCheck.unregistered", "BatchIndependenceCheck", "OutputRangeCheck", "PredictionDynamics"):
        assert found[name].status == "pass", (name, found[name].message)
    assert "all 4 trainable parameters" in found["ParameterUpdateCheck"].message
    assert found["HeadBiasInit"].details["bias"] == pytest.approx(prior, abs=1e-5)


class CPUModelParallel(LightningModelParallel):
    """Lightning's ``ModelParallelStrategy`` (FSDP2 ``fully_shard`` in ``configure_model``, DTensor parameters) runs on
    CPU with gloo as it is; only the launcher is the spawning one."""

    def _configure_launcher(self) -> None:
        self._launcher = _Launcher(self, start_method="spawn")


class FullyShardedModel(ShardModel):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        for m in self.net:
            if isinstance(m, torch.nn.Linear):
                fully_shard(m, mesh=self.device_mesh["data_parallel"])
        fully_shard(self, mesh=self.device_mesh["data_parallel"])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_model_parallel_cpu_recommended_skips_with_reasons(tmp_path: Any) -> None:
    t = L.Trainer(
        strategy=CPUModelParallel(data_parallel_size=2, tensor_parallel_size=1), accelerator="cpu", devices=2,
        max_epochs=1, callbacks=[*recommended(), Probe(str(tmp_path))], default_root_dir=str(tmp_path), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    L.seed_everything(0)
    t.fit(FullyShardedModel())
    starts = [json.load(open(os.path.join(tmp_path, f"start{r}.json"))) for r in (0, 1)]
    assert {s["type"] for s in starts} == {"DTensor"} and sorted(s["shard"] for s in starts) == [2, 2]
    assert starts[0]["bias"] == starts[1]["bias"]  # left as it was (HeadBiasInit skipped), the same on both ranks
    for r in (0, 1):
        assert json.load(open(os.path.join(tmp_path, f"end{r}.json")))["warnings"] == []
    report = json.load(open(os.path.join(tmp_path, "recipe", "report.json")))
    found = {f["check"]: _finding(f) for f in report["findings"]}
    assert {f.status for f in found.values()} <= {"pass", "skip", "note"}, [
        (f.check, f.status, f.message) for f in found.values() if f.status not in ("pass", "skip", "note")]
    for name in ("HeadBiasInit", "ParameterUpdateCheck"):
        assert found[name].status == "skip" and "ModelParallelStrategy" in found[name].message
    # the probes run on every rank (FSDP2 gathers in forward), the DTensor bias is read whole
    for name in ("InitialLossCheck", "WiringCheck.unregistered", "BatchIndependenceCheck", "OutputRangeCheck",
                 "PredictionDynamics", "GeneralizationCheck.transfer", "OptimizationHealthCheck.gradients"):
        assert found[name].status == "pass", (name, found[name].message)


# -- DeepSpeed / ModelParallel: recognised by class name ---------------------------------------------------------------
class DeepSpeedStrategy(SingleDeviceStrategy):
    """Stands in for Lightning's ``DeepSpeedStrategy`` (not installed): the name and the ``config`` are what count."""

    def __init__(self, stage: int) -> None:
        super().__init__(device=torch.device("cpu"))
        self.config = {"zero_optimization": {"stage": stage}}


class ModelParallelStrategy(SingleDeviceStrategy):
    def __init__(self) -> None:
        super().__init__(device=torch.device("cpu"))


@pytest.mark.parametrize(("strategy", "expect"), [
    (lambda: DeepSpeedStrategy(3), "DeepSpeed (ZeRO stage 3)"),
    (lambda: DeepSpeedStrategy(2), "DeepSpeed (ZeRO stage 2)"),
    (lambda: ModelParallelStrategy(), "ModelParallelStrategy"),
], ids=["deepspeed3", "deepspeed2", "model_parallel"])
def test_unsupported_sharding_skips_with_reason(tmp_path: Any, strategy: Any, expect: str) -> None:
    x, y = blobs(n=256, priors=PRIORS)
    model = TinyModel()
    before = model.net[-1].bias.detach().clone()
    t = trainer(tmp_path, recommended(), max_epochs=1, strategy=strategy())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)  # a skip is a finding, never a warning
        t.fit(model, loader(x, y, batch_size=16))
    found = {f.check: f for f in collect_findings(t)}
    for name in ("HeadBiasInit", "ParameterUpdateCheck"):
        assert found[name].status == "skip" and expect in found[name].message, found[name].message
    assert "set the head's bias in `configure_model`" in found["HeadBiasInit"].message
    assert "ParameterUpdateCheck.zero_grad" not in found
    # the bias was left as it was (no write the strategy would not see), and the other checks ran
    assert model.net[-1].bias.detach().tolist() != pytest.approx(torch.log(torch.tensor(PRIORS)).tolist(), abs=0.1)
    assert found["InitialLossCheck"].status == "pass" and found["OutputRangeCheck"].status == "pass"
    assert before.shape == model.net[-1].bias.shape


def test_sharding_by_class_name() -> None:
    class T:
        def __init__(self, strategy: Any) -> None:
            self.strategy = strategy

    class MyFSDP(CPUFSDP):  # a user's subclass counts as its base
        pass

    assert sharding(T(MyFSDP.__new__(MyFSDP))) == "fsdp"
    assert sharding(T(DeepSpeedStrategy(3))) == "deepspeed" and zero_stage(T(DeepSpeedStrategy(3))) == 3
    assert sharding(T(ModelParallelStrategy())) == "model_parallel"
    assert sharding(T(SingleDeviceStrategy(torch.device("cpu")))) is None and sharding(T(None)) is None
    assert zero_stage(T(SingleDeviceStrategy(torch.device("cpu")))) == 0
    assert sharding_skip(T(SingleDeviceStrategy(torch.device("cpu"))), "X", "y", "z") is None
    assert sharding_skip(T(MyFSDP.__new__(MyFSDP)), "X", "y", "z") is None  # FSDP: handled, not skipped


def test_wide_dtype_without_float64_on_mps() -> None:
    assert wide_dtype(torch.device("cpu")) is torch.float64
    assert wide_dtype("cuda:0") is torch.float64
    assert wide_dtype(torch.device("mps")) is torch.float32  # MPS has no float64
    assert wide_dtype(torch.device("mps", 0)) is torch.float32
    assert wide(torch.tensor([1, 2])).dtype is torch.float64  # what `.double()` gave, wherever float64 exists
    assert wide(torch.tensor([0.1], dtype=torch.float16)).item() == pytest.approx(0.1, abs=1e-4)


class DeepSigmoid(TinyModel):
    """Ten sigmoid layers: the first layers' gradients vanish (a spread of the per-layer RMS gradient > 1e6)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        layers: list[torch.nn.Module] = []
        for d in [8] + [32] * 9:
            layers += [torch.nn.Linear(d, 32), torch.nn.Sigmoid()]
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(32, 4))


def test_gradient_spread_is_a_note_on_shards(tmp_path: Any) -> None:
    """Under a sharded strategy each rank measures its own pieces of the layers: the per-layer gradient spread that
    warns on one device (a deep sigmoid net: > 1e6) is a note there, with the reason."""
    from lightning_recipe.checks.optimization import OptimizationHealthCheck

    x, y = blobs(512)
    spreads = {}
    for name, strategy in (("single", "auto"), ("sharded", DeepSpeedStrategy(2))):
        L.seed_everything(0, verbose=False)
        cb = OptimizationHealthCheck(on_fail="warn", check_every_n_steps=10)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(tmp_path, [cb], strategy=strategy, max_steps=20).fit(
                DeepSigmoid(optimizer="sgd", lr=0.1), loader(x, y))
        f = next(f for f in cb.findings if f.check.endswith(".gradients"))
        spreads[name] = (f.status, f.measured, [str(w.message) for w in caught if w.category is RecipeWarning])
    assert spreads["single"][0] == "warn" and spreads["single"][1] > 1e6 and spreads["single"][2]
    status, measured, warned = spreads["sharded"]
    assert status == "note" and measured == pytest.approx(spreads["single"][1]) and warned == []
