"""Resuming never runs code from a checkpoint folder: the training state is data (JSON, safetensors), and what
accelerate reads (optimizer, scheduler, RNG states) goes through `weights_only=True` unpickling."""

import argparse
import json
import math
import os
import pickle
import shutil

import pytest
import torch
from accelerate import Accelerator

from medformer_hf import MedformerForMultiTask, training
from medformer_hf.training import CheckpointManager, TrainState, create_ema, export_model_folder

from .conftest import make_tiny_config


class RunsCode:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _manager(directory, ema_decay: float = 0.9) -> tuple[CheckpointManager, TrainState, torch.nn.Module]:
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = MedformerForMultiTask(make_tiny_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = TrainState()
    ema = create_ema(accelerator, model, ema_decay)
    return CheckpointManager(accelerator, directory, 2, state, ema), state, ema


@pytest.fixture
def saved_checkpoint(tmp_path):
    manager, state, ema = _manager(tmp_path / "checkpoints")
    state.step, state.best_metric = 7, 0.75
    with torch.no_grad():
        next(ema.module.parameters()).add_(1.0)
    path = manager.save(7)
    return path, next(ema.module.parameters()).detach().clone()


def test_training_state_and_ema_are_saved_as_data_and_restored(saved_checkpoint, tmp_path):
    path, ema_weight = saved_checkpoint
    assert json.loads((path / "train_state.json").read_text())["step"] == 7
    assert (path / "ema.safetensors").is_file() and not list(path.glob("*custom_checkpoint*"))
    manager, state, ema = _manager(tmp_path / "checkpoints")
    manager.resume("latest")
    assert (state.step, state.best_metric) == (7, 0.75)
    assert torch.equal(next(ema.module.parameters()), ema_weight)


@pytest.mark.parametrize("target", ["custom_checkpoint_0.pkl", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"])
def test_a_crafted_pickle_in_a_checkpoint_never_runs(saved_checkpoint, tmp_path, target):
    path, _ = saved_checkpoint
    marker = tmp_path / "code_ran"
    (path / target).write_bytes(pickle.dumps(RunsCode(marker)))
    manager, _, _ = _manager(tmp_path / "checkpoints")
    if target.startswith("custom_checkpoint"):  # what accelerate would unpickle with weights_only=False: refused
        with pytest.raises(ValueError, match=r"pickled objects \['custom_checkpoint_0.pkl'\].*never loaded"):
            manager.resume(str(path))
    elif target.startswith("random_states"):  # weights_only=True refuses it; accelerate logs that and goes on
        manager.resume(str(path))
    else:  # accelerate's own states are read with weights_only=True, which refuses the crafted global
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            manager.resume(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("removed", ["train_state.json", "ema.safetensors"])
def test_a_folder_without_the_training_state_is_refused(saved_checkpoint, tmp_path, removed):
    path, _ = saved_checkpoint
    (path / removed).unlink()
    manager, _, _ = _manager(tmp_path / "checkpoints")
    with pytest.raises(ValueError, match=f"lacks {removed}"):
        manager.resume(str(path))


def test_a_resume_with_other_training_arguments_is_refused_and_with_the_same_ones_continues(tmp_path):
    arguments = {"learning_rate": 0.001, "datasets": ["breastmnist"], "seed": 0}
    manager, state, _ = _manager(tmp_path / "checkpoints")
    manager.arguments = arguments
    state.step = 4
    path = manager.save(4)
    assert json.loads((path / "run_arguments.json").read_text()) == arguments
    resumed, state, _ = _manager(tmp_path / "checkpoints")
    resumed.arguments = {**arguments, "learning_rate": 0.5, "datasets": ["breastmnist", "pneumoniamnist"]}
    with pytest.raises(ValueError, match=r"--datasets \['breastmnist'\] -> .*--learning_rate 0.001 -> 0.5"):
        resumed.resume("latest")
    assert state.step == 0  # nothing was loaded
    # A checkpoint of the other script is named as such, not as a difference in the flags both scripts have.
    resumed.arguments = {**arguments, "script": "finetune.py"}
    (path / "run_arguments.json").write_text(json.dumps({**arguments, "script": "pretrain.py"}))
    with pytest.raises(ValueError, match="is a checkpoint of pretrain.py, not of finetune.py: resume it with pretrain"):
        resumed.resume("latest")
    resumed.arguments = {**arguments, "num_processes": 2}  # recorded at 1 process (manager.arguments above)
    manager.arguments = {**arguments, "num_processes": 1}
    manager.save(4)
    with pytest.raises(ValueError, match="--num_processes 1 -> 2"):
        resumed.resume("latest")
    # A flag that only one version has (added or removed by an upgrade) is not compared.
    resumed.arguments = {**{k: v for k, v in arguments.items() if k != "seed"}, "mixup_alpha": 0.0}
    resumed.resume("latest")
    assert state.step == 4


def test_run_arguments_leave_out_where_things_go_and_the_hub_token_and_keep_the_process_count():
    """The process count sets the global batch and the schedule: a resume on another count would replay the learning
    rate at the wrong pace, so it is recorded like a training flag."""
    args = argparse.Namespace(learning_rate=0.001, output_dir="a", data_dir="b", hub_token="secret", num_workers=2)
    assert training.run_arguments(args, num_processes=2) == {"learning_rate": 0.001, "num_processes": 2}


def test_a_training_state_saved_before_the_accuracy_tie_break_still_resumes(saved_checkpoint, tmp_path):
    """Runs started by an earlier version (no `best_accuracy` in their state) resume; the tie-break starts unset."""
    path, _ = saved_checkpoint
    copy = shutil.copytree(path, tmp_path / "older")
    (copy / "train_state.json").write_text('{"step": 7, "epoch": 0, "batch_in_epoch": 3, "best_metric": 0.75}')
    manager, state, _ = _manager(tmp_path / "checkpoints")
    manager.resume(str(copy))
    assert (state.step, state.batch_in_epoch, state.best_metric, state.best_accuracy) == (7, 3, 0.75, -math.inf)


@pytest.mark.parametrize(
    "content", ['{"step": "os.system"}', "[1, 2]", '{"step": 1}', '{"step": 1, "epoch": 0, "batch_in_epoch": 0}']
)
def test_a_tampered_training_state_is_refused(saved_checkpoint, tmp_path, content):
    path, _ = saved_checkpoint
    copy = shutil.copytree(path, tmp_path / "tampered")
    (copy / "train_state.json").write_text(content)
    manager, _, _ = _manager(tmp_path / "checkpoints")
    with pytest.raises(ValueError, match="train_state.json"):
        manager.resume(str(copy))


# ---------------------------------------------------------------------------------------------- the model folder


def _export(folder, marker: str, fail_after: str | None = None) -> None:
    def write(partial):
        for name in ("model.safetensors", "preprocessor_config.json", "README.md", "config.json"):
            if name == fail_after:
                raise KeyboardInterrupt("killed while writing")
            (partial / name).write_text(marker)

    export_model_folder(folder, write)


def test_an_export_killed_while_writing_keeps_the_previous_model(tmp_path):
    _export(tmp_path, "first")
    with pytest.raises(KeyboardInterrupt):
        _export(tmp_path, "second", fail_after="README.md")
    assert {path.name: path.read_text() for path in tmp_path.iterdir() if path.is_file()} == {
        name: "first" for name in ("model.safetensors", "preprocessor_config.json", "README.md", "config.json")
    }
    _export(tmp_path, "third")  # the next export clears what the killed one left
    assert not (tmp_path / ".export-partial").exists() and (tmp_path / "config.json").read_text() == "third"


def test_new_weights_never_sit_beside_the_test_metrics_of_old_ones(tmp_path):
    _export(tmp_path, "first")
    (tmp_path / "metrics.json").write_text("test metrics of the first weights")
    for folder in ("test_time_flips", "validation"):  # evaluate.py's other records (flip-averaged, other splits)
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "metrics.json").write_text(f"{folder} metrics of the first weights")
    # A fine-tune's validation record, confusion matrices and old-task report (say, before --overwrite_output_dir).
    for name in ("validation_metrics.json", "validation_metrics.md", "old_tasks_validation.md"):
        (tmp_path / name).write_text("of the first weights")
    (tmp_path / "confusion_matrices").mkdir()
    (tmp_path / "confusion_matrices" / "breastmnist_test.png").write_text("of the first weights")
    export_model_folder(tmp_path, lambda partial: (partial / "config.json").write_text("second"))
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]


def test_an_export_killed_while_moving_files_leaves_no_loadable_model(tmp_path, monkeypatch):
    _export(tmp_path, "first")
    moves = []

    def replace_then_die(source, target):
        if len(moves) == 2:
            raise KeyboardInterrupt("killed between two renames")
        moves.append(target)
        os.rename(source, target)

    monkeypatch.setattr(training.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        _export(tmp_path, "second")
    assert not (tmp_path / "config.json").exists()  # absent: from_pretrained refuses it, nothing half-old loads


def test_a_run_resumed_elsewhere_carries_its_best_model_or_forgets_a_best_it_cannot_carry(tmp_path):
    """Resumed into another folder, the run's best model so far comes along (not its checkpoints or logs). At home
    nothing is copied; where the run's folder holds no model of this checkpoint's best (a later export, or a copied
    checkpoint folder) the score is forgotten so the next validation exports one, and a finished run is refused."""
    accelerator = Accelerator(cpu=True)
    source = tmp_path / "run"
    checkpoint = source / "checkpoints" / "step_00000006"
    checkpoint.mkdir(parents=True)
    (source / "runs").mkdir()

    def resumed_state() -> TrainState:
        return TrainState(step=6, best_metric=0.8, best_accuracy=0.7)

    training.carry_best_model(accelerator, checkpoint, source, resumed_state(), max_steps=12)  # at home: nothing
    assert sorted(path.name for path in source.iterdir()) == ["checkpoints", "runs"]
    (source / "config.json").write_text("{}")
    (source / "validation_metrics.json").write_text('{"step": 6}')
    state = resumed_state()
    training.carry_best_model(accelerator, checkpoint, tmp_path / "moved", state, max_steps=12)
    assert sorted(path.name for path in (tmp_path / "moved").iterdir()) == ["config.json", "validation_metrics.json"]
    assert state.best_metric == 0.8
    (source / "validation_metrics.json").write_text('{"step": 9}')  # the run went on and kept a later model
    state = resumed_state()
    training.carry_best_model(accelerator, checkpoint, tmp_path / "later", state, max_steps=12)
    assert not (tmp_path / "later").exists() and state.best_metric == state.best_accuracy == -math.inf
    copied = shutil.copytree(checkpoint, tmp_path / "backup" / "step_00000012")
    finished = TrainState(step=12, best_metric=0.8, best_accuracy=0.7)
    with pytest.raises(ValueError, match="ends its run"):
        training.carry_best_model(accelerator, copied, tmp_path / "elsewhere", finished, max_steps=12)
    training.carry_best_model(accelerator, None, tmp_path / "fresh", resumed_state(), max_steps=12)
    assert not (tmp_path / "fresh").exists()
