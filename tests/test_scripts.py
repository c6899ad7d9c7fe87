"""The example scripts end to end on the real MedMNIST files: tiny model, few steps, CPU."""

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from medformer_hf import (
    MedformerConfig,
    MedformerForImageClassification,
    MedformerForMultiTask,
    MedformerImageProcessor,
)
from medformer_hf.data import CATALOGUE
from medformer_hf.hub import HubError, card_metrics, push_folder, upload_plan

from .conftest import DATA_DIR, REPO_ROOT
from .test_remote_code import run_without_the_package

EXAMPLES = REPO_ROOT / "examples"
RELEASE = REPO_ROOT / "checkpoints" / "medformer-small-medmnist"
DATASETS = ["breastmnist", "vesselmnist3d"]
SMALL_RUN = ["--data_dir", str(DATA_DIR), "--datasets", *DATASETS, "--batch_size", "8", "--report_to", "none"]


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "MEDFORMER_CACHE": str(tmp_path / "medformer_cache"),
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        **extra,
    }


def run_script(tmp_path: Path, script: str, *arguments: str, processes: int = 1, **env: str):
    """Run an example with python (1 process) or under accelerate with `processes` gloo processes."""
    if processes == 1:
        command = [sys.executable, str(EXAMPLES / script), *arguments]
    else:  # accelerate 1.15 starts CPU processes with --multi_gpu + ACCELERATE_USE_CPU
        env["ACCELERATE_USE_CPU"] = "true"
        command = [
            *(sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu"),
            *("--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no"),
            *("--dynamo_backend", "no", str(EXAMPLES / script), *arguments),
        ]
    return subprocess.run(command, env=environment(tmp_path, **env), capture_output=True, text=True, timeout=600)


def load_example(name: str):
    """An example script as a module, to call its functions in-process."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def without_stored_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """This process's Hub library offline and blind to a token saved on the machine (`hf auth login`), as a child
    process started with `environment` is: it read HF_HOME and HF_HUB_OFFLINE when it was imported."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def run_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path, script: str, *arguments: str, **env
) -> subprocess.CompletedProcess:
    """An example's `main()` run in this process until it exits (as --help and start-up errors do), from `tmp_path`
    with `environment`'s variables: what `run_script` reports, without an interpreter start-up per call."""
    for key, value in environment(tmp_path, **env).items():
        monkeypatch.setenv(key, value)
    without_stored_token(monkeypatch, tmp_path)  # and offline: the library read HF_HOME and the rest at import
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, *arguments])
    module = load_example(script.removesuffix(".py"))
    with pytest.raises(SystemExit) as stopped:
        module.main()
    captured = capsys.readouterr()
    code = stopped.value.code
    if isinstance(code, str):  # as the interpreter does at exit: the message on stderr, status 1
        return subprocess.CompletedProcess(script, 1, captured.out, f"{captured.err}{code}\n")
    return subprocess.CompletedProcess(script, code or 0, captured.out, captured.err)


def checked(result) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scripts")


@pytest.fixture(scope="module")
def pretrained(workdir) -> Path:
    output = workdir / "pretrain"
    checked(
        run_script(
            workdir,
            "pretrain.py",
            *SMALL_RUN,
            "--max_steps",
            "6",
            "--checkpointing_steps",
            "3",
            "--output_dir",
            str(output),
            "--report_to",
            "tensorboard",
        )
    )
    return output


def test_pretrain_writes_a_hub_ready_folder_and_pictures(pretrained):
    names = {path.name for path in pretrained.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "modeling_medformer.py",
        "preprocessor_config.json",
        "README.md",
    } <= names
    assert sorted(path.name for path in (pretrained / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    assert list((pretrained / "runs").rglob("events.out.tfevents.*")), "no TensorBoard logs"
    assert {path.name for path in (pretrained / "reconstructions").iterdir()} >= {
        "step_00000006_breastmnist.png",
        "step_00000006_vesselmnist3d.png",
    }


def test_pretrain_finetune_evaluate_end_to_end(pretrained, workdir, tmp_path):
    finetuned = workdir / "finetune"
    run = [*SMALL_RUN, "--max_steps", "6", "--checkpointing_steps", "3", "--init_from", str(pretrained)]
    run += ["--label_fraction", "0.5", "--mixup_alpha", "0.2", "--output_dir", str(finetuned)]
    finetuning = checked(run_script(workdir, "finetune.py", *run))
    validation = json.loads((finetuned / "validation_metrics.json").read_text())
    assert set(validation["metrics"]) == set(DATASETS)
    # Each validation is one console line; the end says where the model went.
    assert finetuning.stdout.count("validation AUC: breastmnist") == 2
    assert f"model folder: {finetuned.resolve()}" in finetuning.stdout
    assert (finetuned / "confusion_matrices" / "breastmnist_validation.png").is_file()
    # The backbone started from the pre-trained weights (it moved, but from there).
    before, after = load_file(pretrained / "model.safetensors"), load_file(finetuned / "model.safetensors")
    latents = "medformer.input_adaptformer.latents"
    assert (after[latents] - before[latents]).abs().max() < 0.05

    result = checked(run_script(workdir, "evaluate.py", "--model", str(finetuned), "--data_dir", str(DATA_DIR)))
    metrics = json.loads((finetuned / "metrics.json").read_text())["metrics"]
    assert {name: values["samples"] for name, values in metrics.items()} == {"breastmnist": 156, "vesselmnist3d": 382}
    assert "| breastmnist |" in (finetuned / "metrics.md").read_text() and "ResNet-18" in result.stdout
    assert card_metrics(ModelCard.load(finetuned / "README.md")) == {
        name: {"acc": round(values["acc"], 4), "auc": round(values["auc"], 4)} for name, values in metrics.items()
    }
    # Test-time flips go next to the model; its single-view metrics stay, the card adds the flip-averaged table.
    card = card_metrics(ModelCard.load(finetuned / "README.md"))
    checked(
        run_script(workdir, "evaluate.py", "--model", str(finetuned), "--data_dir", str(DATA_DIR), "--test_time_flips")
    )
    flipped = json.loads((finetuned / "test_time_flips" / "metrics.json").read_text())
    assert flipped["test_time_flips"] and flipped["metrics"]["breastmnist"]["samples"] == 156
    assert flipped["metrics"] != metrics and json.loads((finetuned / "metrics.json").read_text())["metrics"] == metrics
    assert card_metrics(ModelCard.load(finetuned / "README.md")) == card
    assert "`examples/evaluate.py --test_time_flips`" in (finetuned / "README.md").read_text()
    # The validation split goes to <model>/validation/; re-evaluating one set on test updates it and keeps the other.
    for split in ("validation", "test"):
        arguments = (
            "--model",
            str(finetuned),
            "--data_dir",
            str(DATA_DIR),
            "--split",
            split,
            "--datasets",
            "breastmnist",
        )
        checked(run_script(workdir, "evaluate.py", *arguments))
    assert set(json.loads((finetuned / "validation" / "metrics.json").read_text())["metrics"]) == {"breastmnist"}
    assert json.loads((finetuned / "metrics.json").read_text())["metrics"] == metrics
    assert card_metrics(ModelCard.load(finetuned / "README.md")) == card
    # A resume that changes what is trained is refused in one line, not a traceback, and changes nothing.
    refused = run_script(workdir, "finetune.py", *run, "--resume_from_checkpoint", "latest", "--learning_rate", "0.5")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("finetune.py: error: ")
    assert "other arguments (--learning_rate" in refused.stderr
    assert json.loads((finetuned / "metrics.json").read_text())["metrics"] == metrics
    # Resuming the finished run (to push it, say) keeps the card's test metrics: they are of the same weights.
    checked(run_script(workdir, "finetune.py", *run, "--resume_from_checkpoint", "latest"))
    assert card_metrics(ModelCard.load(finetuned / "README.md")) == card
    assert "(50% of the training labels)" in (finetuned / "README.md").read_text()
    # Resumed from its last checkpoint into another folder, the run keeps its best model so far there too.
    moved = workdir / "finetune_moved"
    last = sorted((finetuned / "checkpoints").iterdir())[-1]
    resumed = run_script(
        workdir, "finetune.py", *run, "--resume_from_checkpoint", str(last), "--output_dir", str(moved)
    )
    checked(resumed)
    assert (moved / "checkpoints" / last.name).is_dir()  # saved at once: `latest` continues it there if killed
    assert load_file(moved / "model.safetensors").keys() == load_file(finetuned / "model.safetensors").keys()
    for name, value in load_file(moved / "model.safetensors").items():
        assert torch.equal(value, load_file(finetuned / "model.safetensors")[name])
    # The exported folder loads where medformer_hf cannot be imported.
    pixels = {"pixel_values": torch.rand(2, 1, 28, 28, 28)}
    loaded = run_without_the_package(finetuned, "base", pixels, tmp_path)
    assert loaded["class"] == "MedformerModel" and loaded["output"].shape[0] == 2


def test_continuing_a_model_keeps_the_starting_weights_unless_a_step_beats_them(workdir, tmp_path):
    """Fine-tuning a model on its own tasks again (a warm restart) validates the starting weights first: a run whose
    steps never beat them exports them, not the best of its worse steps (learning rate 0: no step can be better)."""
    finetuned = workdir / "finetune"
    if not (finetuned / "config.json").exists():
        pytest.skip("needs the end-to-end test's fine-tuned model")
    again = tmp_path / "again"
    run = [*SMALL_RUN, "--init_from", str(finetuned), "--learning_rate", "0", "--ema_decay", "0", "--max_steps", "2"]
    result = checked(
        run_script(tmp_path, "finetune.py", *run, "--checkpointing_steps", "1", "--output_dir", str(again))
    )
    assert "step 0 validation AUC" in result.stdout
    assert json.loads((again / "validation_metrics.json").read_text())["step"] == 0
    started, exported = load_file(finetuned / "model.safetensors"), load_file(again / "model.safetensors")
    assert all(torch.equal(exported[key], started[key]) for key in started)
    # Retrained at another size, the checkpoint's tasks are still scored "before" as the checkpoint was fed (28 px),
    # and the starting weights are no step-0 candidate: exported, they would claim a size they never learned.
    resized = tmp_path / "resized"
    result = checked(run_script(tmp_path, "finetune.py", *run, "--input_size_2d", "32", "--output_dir", str(resized)))
    assert "step 0 validation AUC" not in result.stdout
    assert "but this model was trained at" not in result.stderr  # "before" feeds 28 px to a model fed 28 px
    assert json.loads((resized / "validation_metrics.json").read_text())["step"] > 0
    assert MedformerImageProcessor.from_pretrained(resized).size_2d == [32, 32]
    before = {folder: json.loads((folder / "old_tasks_before.json").read_text()) for folder in (again, resized)}
    assert before[resized] == before[again]


def test_a_folder_saved_without_its_processor_is_continued_from_its_own_weights_too(tmp_path):
    """No processor and no recorded size: it is fed the files' own size, as this run feeds it, so the starting weights
    stay a step-0 candidate."""
    config = MedformerConfig(hidden_size=32, num_latents=4, num_hidden_layers=1, num_attention_heads=2)
    config.tasks = {"breastmnist": CATALOGUE["breastmnist"].task_spec()}
    MedformerForMultiTask(config).save_pretrained(tmp_path / "plain")
    run = [*SMALL_RUN[:2], "--datasets", "breastmnist", "--batch_size", "8", "--report_to", "none"]
    run += ["--init_from", str(tmp_path / "plain"), "--max_steps", "1", "--output_dir", str(tmp_path / "again")]
    assert "step 0 validation AUC" in checked(run_script(tmp_path, "finetune.py", *run)).stdout


def test_starting_over_in_a_folder_removes_the_earlier_runs_logs_and_pictures(tmp_path):
    """--overwrite_output_dir: the earlier run's TensorBoard events would read as this run's (two values per step),
    and its reconstruction pictures as this run's."""
    output = tmp_path / "pretrain"
    run = [*SMALL_RUN, "--datasets", "breastmnist", "--report_to", "tensorboard", "--output_dir", str(output)]
    checked(run_script(tmp_path, "pretrain.py", *run, "--max_steps", "2", "--checkpointing_steps", "2"))
    first = set((output / "runs").rglob("events.out.tfevents.*"))
    (output / "old_tasks_before.json").write_text("{}")  # as an earlier finetune.py run from a checkpoint left it
    checked(run_script(tmp_path, "pretrain.py", *run, "--max_steps", "1", "--overwrite_output_dir"))
    assert not (output / "old_tasks_before.json").exists()
    second = set((output / "runs").rglob("events.out.tfevents.*"))
    assert first and len(second) == len(first) and not first & second
    assert [path.name for path in (output / "reconstructions").iterdir()] == ["step_00000001_breastmnist.png"]


def test_attentive_probing_trains_the_output_and_heads_on_the_frozen_pre_trained_encoder(pretrained, tmp_path):
    """`--train output_and_heads` from an SSL checkpoint (which has no Output Adaptformer): the encoder stays the
    pre-training's, bit for bit, while the Output Adaptformer and the heads train."""
    probed = tmp_path / "probed"
    checked(
        run_script(
            *(tmp_path, "finetune.py", *SMALL_RUN, "--init_from", str(pretrained), "--train", "output_and_heads"),
            *("--max_steps", "2", "--checkpointing_steps", "1", "--ema_decay", "0", "--output_dir", str(probed)),
        )
    )
    pre_trained = load_file(pretrained / "model.safetensors")
    first, second = (load_file(probed / "checkpoints" / f"step_{step:08d}" / "model.safetensors") for step in (1, 2))
    encoder = [key for key in second if key.startswith("medformer.")]
    assert encoder and all(torch.equal(second[key], pre_trained[key]) for key in encoder)
    trained = [key for key in second if key.startswith(("output_adaptformer.", "task_heads."))]
    assert trained and all(key not in encoder for key in trained)
    assert any(not torch.equal(first[key], second[key]) for key in trained if key.startswith("output_adaptformer."))
    assert any(not torch.equal(first[key], second[key]) for key in trained if key.startswith("task_heads."))


def test_fine_tuning_beside_the_pretext_tasks_trains_them_exports_without_them_and_resumes_exactly(
    pretrained, tmp_path
):
    """`--pretext_weight`: the pre-training's decoder and projector train beside the heads on unlabeled images, ride
    in the checkpoints (so a resumed run, which also draws the same unlabeled batches, ends bit-identical), and stay
    out of the exported model. Two processes: DDP sees every parameter the backward reaches in one forward."""
    run = [*SMALL_RUN, "--datasets", "breastmnist", "--init_from", str(pretrained), "--pretext_weight", "1"]
    run += ["--max_steps", "4", "--checkpointing_steps", "2", "--checkpoints_total_limit", "3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    checked(run_script(tmp_path, "finetune.py", *run, "--output_dir", str(straight), processes=2))
    exported = load_file(straight / "model.safetensors")
    assert exported.keys() == MedformerForMultiTask.from_pretrained(straight).state_dict().keys()
    assert not any(key.startswith("pretext_") for key in exported)
    step = {n: load_file(straight / "checkpoints" / f"step_{n:08d}" / "model.safetensors") for n in (0, 2, 4)}
    decoder = [key for key in step[4] if key.startswith("pretext_heads.decoder.")]
    pre_trained = load_file(pretrained / "model.safetensors")
    assert decoder and all(
        torch.equal(step[0][key], pre_trained[key.removeprefix("pretext_heads.")]) for key in decoder
    )
    assert any(not torch.equal(step[2][key], step[4][key]) for key in decoder)
    assert "its pretext tasks on the unlabeled images, weight 1.0" in (straight / "README.md").read_text()

    middle = straight / "checkpoints" / "step_00000002"
    resume = ["--resume_from_checkpoint", str(middle), "--output_dir", str(resumed)]
    checked(run_script(tmp_path, "finetune.py", *run, *resume, processes=2))
    end = load_file(resumed / "checkpoints" / "step_00000004" / "model.safetensors")
    assert end.keys() == step[4].keys()
    for key in end:
        assert torch.equal(end[key], step[4][key]), key


def test_growing_by_a_new_task_with_a_frozen_backbone_keeps_old_tasks_exact(workdir, tmp_path):
    """`--train new_heads` on a set the checkpoint lacks: old tasks bit-identical, ids appended, a before/after report;
    then evaluate.py on a folder of files without the new set evaluates what it finds and says what it skipped."""
    finetuned = workdir / "finetune"
    if not (finetuned / "config.json").exists():
        pytest.skip("needs the end-to-end test's fine-tuned model")
    grown = tmp_path / "grown"
    run = checked(
        run_script(
            *(tmp_path, "finetune.py", "--data_dir", str(DATA_DIR), "--datasets", "pneumoniamnist"),
            *("--init_from", str(finetuned), "--train", "new_heads", "--max_steps", "3", "--checkpointing_steps", "3"),
            *("--batch_size", "8", "--report_to", "none", "--output_dir", str(grown)),
        )
    )
    old_weights, grown_weights = load_file(finetuned / "model.safetensors"), load_file(grown / "model.safetensors")
    assert set(grown_weights) - set(old_weights) == {
        f"task_heads.pneumoniamnist.{name}" for name in ("queries", "projection.weight", "projection.bias")
    }
    for key, value in old_weights.items():  # every weight the old tasks use is bit-identical
        assert torch.equal(grown_weights[key], value), key
    before = MedformerForMultiTask.from_pretrained(finetuned).eval()
    after = MedformerForMultiTask.from_pretrained(grown).eval()
    assert list(after.config.tasks) == [*before.config.tasks, "pneumoniamnist"]
    inputs = {"breastmnist": torch.rand(3, 1, 28, 28), "vesselmnist3d": torch.rand(3, 1, 28, 28, 28)}
    with torch.no_grad():  # same weights; CPU matmul kernels may round the last bit differently per allocation
        for task, pixels in inputs.items():
            torch.testing.assert_close(
                before(pixels, task=task).logits, after(pixels, task=task).logits, atol=1e-6, rtol=0
            )
    report = (grown / "old_tasks_validation.md").read_text()
    assert report.count("+0.0000") == 2 and "before and after" in run.stdout
    own = tmp_path / "own_output"  # the same with an Output Adaptformer of its own: still nothing old moves
    checked(
        run_script(
            *(tmp_path, "finetune.py", "--data_dir", str(DATA_DIR), "--datasets", "pneumoniamnist"),
            *("--init_from", str(finetuned), "--train", "new_heads_and_output", "--max_steps", "2"),
            *("--checkpointing_steps", "2", "--batch_size", "8", "--report_to", "none", "--output_dir", str(own)),
        )
    )
    own_weights = load_file(own / "model.safetensors")
    private = {key for key in own_weights if key.startswith("private_output_adaptformers.pneumoniamnist.")}
    assert private and all(torch.equal(own_weights[key], value) for key, value in old_weights.items())
    moved = [
        key
        for key in private
        if not torch.equal(
            own_weights[key],
            old_weights[key.replace("private_output_adaptformers.pneumoniamnist.", "output_adaptformer.")],
        )
    ]
    assert moved  # it started as a copy of the shared one and trained
    adapted = tmp_path / "adapters"  # and with Main Body adapters of its own: still nothing old moves
    checked(
        run_script(
            *(tmp_path, "finetune.py", "--data_dir", str(DATA_DIR), "--datasets", "pneumoniamnist"),
            *("--init_from", str(finetuned), "--train", "new_heads_and_adapters", "--adapter_rank", "2"),
            "--adapt_input",
            *("--max_steps", "2", "--checkpointing_steps", "2", "--batch_size", "8", "--report_to", "none"),
            *("--output_dir", str(adapted)),
        )
    )
    adapted_weights = load_file(adapted / "model.safetensors")
    assert all(torch.equal(adapted_weights[key], value) for key, value in old_weights.items())
    ups = [
        key for key in adapted_weights if key.startswith("medformer.task_adapters.pneumoniamnist.") and ".up." in key
    ]
    assert any(".input_layers." in key for key in ups) and any(".input_layers." not in key for key in ups)
    assert all(adapted_weights[key].abs().max() > 0 for key in ups)  # started at zero and trained
    adapted_config = json.loads((adapted / "config.json").read_text())
    assert adapted_config["adapter_tasks"] == {"pneumoniamnist": 2}
    assert adapted_config["input_adapter_tasks"] == ["pneumoniamnist"]
    assert "--train new_heads_and_adapters, seed 0" in (adapted / "README.md").read_text()  # the card says how
    refused = run_script(
        *(tmp_path, "finetune.py", "--data_dir", str(DATA_DIR), "--datasets", "breastmnist", "pneumoniamnist"),
        *("--init_from", str(finetuned), "--train", "new_heads", "--output_dir", str(tmp_path / "refused")),
    )
    assert refused.returncode != 0 and "drop them from --datasets, or replay them with --train all" in refused.stderr

    only_old = tmp_path / "only_old_files"
    only_old.mkdir()
    for name in DATASETS:
        (only_old / f"{name}.npz").symlink_to(DATA_DIR / f"{name}.npz")
    result = checked(run_script(tmp_path, "evaluate.py", "--model", str(grown), "--data_dir", str(only_old)))
    assert "skipped tasks without a local MedMNIST file: pneumoniamnist" in result.stdout
    assert set(json.loads((grown / "metrics.json").read_text())["metrics"]) == set(DATASETS)


@pytest.mark.parametrize(
    ("train", "rate"), [("new_heads", 0.0), ("new_heads_and_output", 0.0), ("new_heads_and_adapters", 0.1)]
)
def test_a_frozen_main_body_trains_new_heads_without_stochastic_depth(train, rate):
    """The released checkpoint has stochastic depth 0.1: heads grown on its frozen body must see the features it gives
    at inference, not randomly dropped ones; adapters train inside the body, so there the rate stays."""
    script = load_example("finetune")
    released = REPO_ROOT / "checkpoints" / "medformer-small-medmnist"
    arguments = dict(datasets=["dermamnist"], drop_path_rate=None, init_from=str(released), adapter_rank=8)
    model, old_tasks = script.build_model(argparse.Namespace(**arguments, train=train, adapt_input=False))
    assert "dermamnist" in model.config.tasks and "dermamnist" not in old_tasks
    assert model.config.drop_path_rate == rate


def test_two_processes_pretrain_and_evaluate_like_one(pretrained, workdir):
    two = workdir / "pretrain_2proc"
    checked(run_script(workdir, "pretrain.py", *SMALL_RUN, "--max_steps", "2", "--output_dir", str(two), processes=2))
    assert (two / "model.safetensors").is_file()

    finetuned = workdir / "finetune"
    if not (finetuned / "config.json").exists():
        pytest.skip("needs the end-to-end test's fine-tuned model")
    single, double = workdir / "eval_1", workdir / "eval_2"
    for output, processes in ((single, 1), (double, 2)):
        checked(
            run_script(
                workdir,
                "evaluate.py",
                "--model",
                str(finetuned),
                "--data_dir",
                str(DATA_DIR),
                "--batch_size",
                "50",
                "--output_dir",
                str(output),
                processes=processes,
            )
        )
    one = json.loads((single / "metrics.json").read_text())["metrics"]
    two_metrics = json.loads((double / "metrics.json").read_text())["metrics"]
    assert two_metrics["vesselmnist3d"]["samples"] == 382 and two_metrics["breastmnist"]["samples"] == 156
    for name in DATASETS:
        assert two_metrics[name]["acc"] == pytest.approx(one[name]["acc"], abs=1e-9)
        assert two_metrics[name]["auc"] == pytest.approx(one[name]["auc"], abs=1e-6)


def test_killed_run_resumes_to_the_same_weights(workdir):
    # Every pretext, augmented views and block masks: all their random draws (masks, augmentations, slices) must
    # resume exactly.
    pretexts = ["--ssl_tasks", "masked_reconstruction", "view_agreement", "slice_consistency", "--augment"]
    pretexts += ["--mask_unit", "2"]
    arguments = [*SMALL_RUN, *pretexts, "--max_steps", "24", "--checkpointing_steps", "4", "--checkpoints_total_limit"]
    arguments.append("10")
    straight = workdir / "straight"
    checked(run_script(workdir, "pretrain.py", *arguments, "--output_dir", str(straight)))
    assert json.loads((straight / "config.json").read_text())["mask_unit"] == 2

    resumed = workdir / "resumed"
    command = [sys.executable, str(EXAMPLES / "pretrain.py"), *arguments, "--output_dir", str(resumed)]
    process = subprocess.Popen(command, env=environment(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (resumed / "checkpoints" / "step_00000004").exists() and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = sorted(path.name for path in (resumed / "checkpoints").iterdir() if path.name.startswith("step_"))
    assert done and done[-1] != "step_00000024", f"the run finished before it was killed: {done}"
    # A kill during a later checkpoint write leaves a partial folder: it must be ignored.
    partial = resumed / "checkpoints" / ".partial-step_00000099"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")
    checked(
        run_script(
            workdir, "pretrain.py", *arguments, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"
        )
    )
    expected, actual = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_a_run_killed_between_its_first_export_and_its_first_checkpoint_resumes(workdir):
    """Validation exports the best model just before the periodic checkpoint is written; a kill in between once left a
    folder with a model and no checkpoint, which `--resume_from_checkpoint latest` refuses. A fresh run's step-0
    checkpoint closes that window: resumed from it, the run ends with the uninterrupted run's weights."""
    arguments = [*SMALL_RUN, "--max_steps", "4", "--checkpointing_steps", "2", "--checkpoints_total_limit", "3"]
    straight = workdir / "finetune_straight"
    checked(run_script(workdir, "finetune.py", *arguments, "--output_dir", str(straight)))
    checkpoints = sorted(path.name for path in (straight / "checkpoints").iterdir())
    assert checkpoints == ["step_00000000", "step_00000002", "step_00000004"]

    killed = workdir / "finetune_killed_before_its_first_checkpoint"
    shutil.copytree(straight, killed)
    for name in checkpoints[1:]:  # what a kill after the first export, before its checkpoint, leaves: a model, step 0
        shutil.rmtree(killed / "checkpoints" / name)
    resume = ("--output_dir", str(killed), "--resume_from_checkpoint", "latest")
    checked(run_script(workdir, "finetune.py", *arguments, *resume))
    expected, actual = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_a_single_task_classifier_is_refused_as_a_starting_point_in_one_line(tmp_path, monkeypatch, capsys):
    """As a multi-task model its trained head would go unused and its task's head would start random."""
    release = MedformerForMultiTask.from_pretrained(REPO_ROOT / "checkpoints" / "medformer-small-medmnist")
    MedformerForImageClassification.from_multi_task(release, "breastmnist").config.save_pretrained(tmp_path / "one")
    result = run_main(monkeypatch, capsys, tmp_path, "finetune.py", "--data_dir", str(DATA_DIR), "--init_from", "one")
    assert result.returncode == 2 and "holds a single-task classifier" in result.stderr.strip().splitlines()[-1]


def test_a_resume_never_writes_over_a_folder_it_does_not_continue(tmp_path, monkeypatch, capsys):
    """`latest` in a folder of the user's files without a checkpoint once trained a new run over them; another run's
    checkpoint resumed into a folder holding a model wrote a card of that run beside the folder's own weights."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("mine")
    elsewhere = tmp_path / "elsewhere" / "checkpoints" / "step_00000002"
    elsewhere.mkdir(parents=True)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    for arguments, message in [
        (
            ["--output_dir", str(mine), "--resume_from_checkpoint", "latest"],
            "holds files (README.md) but no checkpoint",
        ),
        (["--output_dir", str(mine), "--resume_from_checkpoint", str(elsewhere)], "not a checkpoint of the run in"),
        (["--resume_from_checkpoint", str(tmp_path / "run")], "is a run's folder, not one of its checkpoints"),
    ]:
        result = run_main(monkeypatch, capsys, tmp_path, "finetune.py", "--data_dir", str(DATA_DIR), *arguments)
        assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1]
    assert [path.name for path in mine.iterdir()] == ["README.md"] and (mine / "README.md").read_text() == "mine"
    # A folder with only the logs of a refused attempt takes the checkpoint (here refused later: it is not one).
    (tmp_path / "retry" / "runs").mkdir(parents=True)
    arguments = ["--datasets", "breastmnist", "--output_dir", "retry", "--resume_from_checkpoint", str(elsewhere)]
    result = run_main(monkeypatch, capsys, tmp_path, "finetune.py", "--data_dir", str(DATA_DIR), *arguments)
    assert result.returncode == 1 and "lacks train_state.json" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("script", "arguments", "message"),
    [
        ("pretrain.py", ["--data_dir", str(DATA_DIR), "--datasets", "brainmnist"], "unknown dataset(s) ['brainmnist']"),
        ("finetune.py", ["--data_dir", str(DATA_DIR), "--label_fraction", "1.5"], "--label_fraction must be in (0, 1]"),
        ("finetune.py", ["--data_dir", "/nonexistent/medmnist"], "--data_dir /nonexistent/medmnist does not exist"),
        ("pretrain.py", ["--datasets", "dermamnist"], "dermamnist.npz is not in"),
        ("pretrain.py", ["--data_dir", str(DATA_DIR), "--push_to_hub"], "--push_to_hub needs --hub_model_id"),
        (
            "pretrain.py",
            ["--data_dir", str(DATA_DIR), "--ssl_loss_weights", "slice_consistency=0.2"],
            "'slice_consistency' is not among --ssl_tasks",
        ),
        ("pretrain.py", ["--data_dir", str(DATA_DIR), "--ssl_loss_weights", "view_agreement=x"], "with a number"),
        ("evaluate.py", ["--model", "/nonexistent/model"], "has no config.json"),
        (
            "evaluate.py",
            ["--model", str(REPO_ROOT / "checkpoints" / "medformer-small-medmnist"), "--data_dir", "/nonexistent/m"],
            "--data_dir /nonexistent/m does not exist",
        ),
        (
            "average_weights.py",
            ["--models", "a", "b", "--output_dir", "soup", "--greedy", "--data_dir", "/nonexistent/m"],
            "--data_dir /nonexistent/m does not exist",
        ),
        ("finetune.py", ["--data_dir", str(DATA_DIR), "--output_dir", str(EXAMPLES)], "--overwrite_output_dir"),
        (
            "finetune.py",
            ["--data_dir", str(DATA_DIR), "--init_from", str(RELEASE), "--conv_stem_blocks", "1"],
            "--conv_stem_blocks shape a model built from scratch",
        ),
        (
            "finetune.py",
            ["--data_dir", str(DATA_DIR), "--init_from", str(RELEASE), "--model_size", "tiny"],
            "--model_size shape a model built from scratch",  # the default value, given: still refused
        ),
        (
            "finetune.py",
            ["--data_dir", str(DATA_DIR), "--resume_from_checkpoint", "latest", "--overwrite_output_dir"],
            "--overwrite_output_dir starts over: pass one",
        ),
        ("pretrain.py", ["--data_dir", str(DATA_DIR), "--max_grad_norm", "-1"], "0 turns clipping off"),
        ("finetune.py", ["--data_dir", str(DATA_DIR), "--input_size_2d", "0"], "--input_size_2d must be >= 1, got 0"),
        (
            "pretrain.py",
            ["--data_dir", str(DATA_DIR), "--checkpoints_total_limit", "0"],
            "--checkpoints_total_limit must be >= 1, got 0",
        ),
        ("finetune.py", ["--datasets", "breastmnist", "BreastMNIST"], "names ['breastmnist'] more than once"),
        (
            "pretrain.py",
            ["--data_dir", str(DATA_DIR), "--push_to_hub", "--hub_model_id", "user/m"],
            "--push_to_hub needs a Hugging Face token",
        ),
        ("finetune.py", ["--data_dir", str(DATA_DIR), "--adapter_rank", "4"], "add that, or drop it"),
        ("finetune.py", ["--data_dir", str(DATA_DIR), "--adapt_input"], "--adapt_input extends the adapters"),
        (
            "finetune.py",
            ["--data_dir", str(DATA_DIR), "--init_from", str(RELEASE), "--train", "new_heads", "--layer_decay", "0.7"],
            "--layer_decay changes nothing with --train new_heads",
        ),
        (
            "finetune.py",
            ["--data_dir", str(DATA_DIR), "--init_from", str(RELEASE), "--train", "output_and_heads"]
            + ["--drop_path_rate", "0.1"],
            "which --train output_and_heads freezes",
        ),
        (
            "finetune.py",
            ["--data_dir", str(DATA_DIR), "--init_from", str(RELEASE), "--train", "new_heads"]
            + ["--drop_path_rate", "0.1"],
            "which --train new_heads freezes",
        ),
        ("finetune.py", ["--data_dir", str(DATA_DIR), "--pretext_weight", "1"], "pass --init_from <its folder>"),
        (  # the saved processor would feed the release's other 2D heads (trained at 84 px) 28 px images
            "finetune.py",
            ["--data_dir", str(DATA_DIR), "--init_from", str(REPO_ROOT / "checkpoints" / "medformer-small-medmnist")]
            + ["--datasets", "breastmnist", "--input_size_2d", "28"],
            "2D tasks ['pneumoniamnist', 'retinamnist'], which this run does not train, learned at 84x84 px",
        ),
        (  # the model would refuse it at step 0, after a checkpoint was written
            "finetune.py",
            ["--data_dir", str(DATA_DIR), "--input_size_2d", "30"],
            "--input_size_2d 30 is not a multiple of the model's 2D patch size 4: pass 28 or 32",
        ),
        ("pretrain.py", ["--data_dir", str(DATA_DIR), "--input_size_3d", "2"], "3D patch size 4: pass 4."),
        ("finetune.py", ["--data_dir", str(DATA_DIR), "--init_from", "/no/such/folder"], "is not a folder (nor a Hub"),
        ("finetune.py", ["--data_dir", str(DATA_DIR), "--init_from", str(EXAMPLES)], "has no config.json: pass a"),
        (  # --num_train_epochs once replaced the --max_steps given beside it without a word
            "finetune.py",
            ["--data_dir", str(DATA_DIR), "--max_steps", "5", "--num_train_epochs", "0.3"],
            "--max_steps and --num_train_epochs both set the budget",
        ),
        (
            "finetune.py",
            ["--data_dir", str(DATA_DIR), "--init_from", str(RELEASE), "--train", "output_and_heads"]
            + ["--pretext_weight", "1"],
            "--pretext_weight trains the encoder, which --train output_and_heads freezes",
        ),
        (  # a fine-tuned model has no trained decoder or projector: the pretext tasks would start from nothing
            "finetune.py",
            ["--data_dir", str(DATA_DIR), "--init_from", str(REPO_ROOT / "checkpoints" / "medformer-small-medmnist")]
            + ["--pretext_weight", "1"],
            "is not a pre-training (pretrain.py's folder)",
        ),
    ],
)
def test_bad_arguments_stop_at_start_up_with_one_line(tmp_path, monkeypatch, capsys, script, arguments, message):
    started = time.time()
    result = run_main(monkeypatch, capsys, tmp_path, script, *arguments, MEDMNIST_ROOT="", HF_TOKEN="")
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert "error:" in last_line and message in last_line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()
    assert time.time() - started < 60


def test_evaluate_scores_a_single_task_classifier_as_its_multi_task_source(tmp_path, monkeypatch, capsys):
    """The README's Trainer route saves a classifier; evaluate.py scores it on the set its config records. Taken out
    of the release (`from_multi_task`: a binary task's logit z as the class logits [0, z]), it gets the release's own
    recorded BreastMNIST test metrics, and the flips its task records."""
    from medformer_hf import MedformerConfig, MedformerForImageClassification, MedformerImageProcessor

    release = REPO_ROOT / "checkpoints" / "medformer-small-medmnist"
    classifier = tmp_path / "classifier"
    MedformerForImageClassification.from_multi_task(release, "breastmnist").save_pretrained(classifier)
    MedformerImageProcessor.from_pretrained(release).save_pretrained(classifier)
    for flags in ([], ["--test_time_flips"]):
        checked(run_script(tmp_path, "evaluate.py", "--model", str(classifier), "--data_dir", str(DATA_DIR), *flags))
        record = Path("test_time_flips" if flags else "", "metrics.json")  # where each evaluation goes
        expected = json.loads((release / record).read_text())
        found = json.loads((classifier / record).read_text())["metrics"]
        assert list(found) == ["breastmnist"]
        assert found["breastmnist"] == pytest.approx(expected["metrics"]["breastmnist"], abs=1e-6)
    assert (classifier / "confusion_matrices" / "breastmnist_test.png").is_file()
    single_view = json.loads((classifier / "metrics.json").read_text())["metrics"]["breastmnist"]
    assert card_metrics(ModelCard.load(classifier / "README.md")) == {
        "breastmnist": {"acc": round(single_view["acc"], 4), "auc": round(single_view["auc"], 4)}
    }
    own_labels = MedformerConfig(hidden_size=32, num_latents=4, num_hidden_layers=1, num_attention_heads=2)
    own_labels.id2label = {0: "benign", 1: "malignant"}  # a classifier of the user's own data: no MedMNIST set
    MedformerForImageClassification(own_labels).save_pretrained(tmp_path / "own")
    result = run_main(monkeypatch, capsys, tmp_path, "evaluate.py", "--model", str(tmp_path / "own"))
    assert result.returncode == 2 and "the classifier's config.tasks records no task" in result.stderr


def test_a_model_folder_is_never_trained_over_and_a_missing_data_folder_is_named(tmp_path, monkeypatch, capsys):
    """`--resume_from_checkpoint latest` in a folder holding a model but no checkpoint would start a new run over it;
    evaluating without local files names --data_dir. A copy of the released config stands in for the model."""
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(REPO_ROOT / "checkpoints" / "medformer-small-medmnist" / "config.json", model)
    for script, arguments, message in [
        (
            "finetune.py",
            ["--data_dir", str(DATA_DIR), "--output_dir", str(model), "--resume_from_checkpoint", "latest"],
            "holds a model but no checkpoint of a run to continue",
        ),
        ("evaluate.py", ["--model", str(model)], "pass --data_dir <folder of the .npz files>"),
    ]:
        result = run_main(monkeypatch, capsys, tmp_path, script, *arguments, MEDMNIST_ROOT="", HF_TOKEN="")
        assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1]
    assert [path.name for path in model.iterdir()] == ["config.json"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--test_time_flips", "--output_dir", "{model}"], "holds the model's test-split metrics; leave"),
        (["--output_dir", "{model}/test_time_flips"], "holds the model's test-split metrics, averaged over flips"),
        (["--split", "validation", "--output_dir", "{model}"], "holds the model's test-split metrics; leave"),
        (["--output_dir", "{model}/validation"], "holds the model's validation-split metrics; leave"),
    ],
)
def test_evaluations_never_overwrite_each_other(tmp_path, monkeypatch, capsys, flags, message):
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(REPO_ROOT / "checkpoints" / "medformer-small-medmnist" / "config.json", model)
    arguments = [flag.format(model=model) for flag in flags]
    result = run_main(
        monkeypatch, capsys, tmp_path, "evaluate.py", "--model", str(model), "--data_dir", str(DATA_DIR), *arguments
    )
    assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1]
    assert sorted(path.name for path in model.iterdir()) == ["config.json"]


def test_evaluating_a_model_trained_on_larger_medmnist_files_asks_which_files(tmp_path, monkeypatch, capsys):
    """A processor that resizes to 64 px, a MedMNIST file size: evaluating on 28 px files without saying so would
    quietly measure another protocol, so --size must be given; the released 84 px model (not a file size) needs none."""
    from medformer_hf import MedformerImageProcessor

    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(REPO_ROOT / "checkpoints" / "medformer-small-medmnist" / "config.json", model)
    MedformerImageProcessor(size_2d=[64, 64], size_3d=[64, 64, 64]).save_pretrained(model)
    result = run_main(monkeypatch, capsys, tmp_path, "evaluate.py", "--model", str(model), "--data_dir", str(DATA_DIR))
    assert result.returncode == 2
    assert "pass --size 64 to evaluate on those files, or --size 28" in result.stderr.strip().splitlines()[-1]
    assert not (model / "metrics.json").exists() and not (model / "README.md").exists()


@pytest.mark.parametrize(
    "script", ["pretrain.py", "finetune.py", "evaluate.py", "export_onnx.py", "extract_task.py", "average_weights.py"]
)
def test_help_lists_the_defaults_and_no_empty_ones(tmp_path, monkeypatch, capsys, script):
    """argparse shows no default for an option without help text: each option with a default has one."""
    parsers = []
    parse_args = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(
        argparse.ArgumentParser, "parse_args", lambda self, *a: parsers.append(self) or parse_args(self, *a)
    )
    result = checked(run_main(monkeypatch, capsys, tmp_path, script, "--help"))
    help_text = " ".join(result.stdout.split())  # argparse wraps lines
    assert "(default:" in help_text or script in ("extract_task.py", "average_weights.py")  # they have no defaults
    assert "default: None" not in help_text and "(default: (default" not in help_text
    unexplained = [
        action.dest
        for action in parsers[0]._actions
        if action.option_strings
        and not action.help
        and not any(action.default is skipped for skipped in (None, False, argparse.SUPPRESS))
    ]
    assert unexplained == []


def test_push_plan_and_clear_hub_errors(pretrained, tmp_path, monkeypatch):
    plan = upload_plan(pretrained)
    assert {
        "config.json",
        "model.safetensors",
        "modeling_medformer.py",
        "configuration_medformer.py",
        "image_processing_medformer.py",
        "preprocessor_config.json",
        "README.md",
    } <= set(plan)
    assert not [path for path in plan if path.startswith(("checkpoints/", "runs/", "reconstructions/"))]
    monkeypatch.delenv("HF_TOKEN", raising=False)
    without_stored_token(monkeypatch, tmp_path)
    with pytest.raises(HubError, match="No Hugging Face token to push to user/medformer"):
        push_folder(pretrained, "user/medformer")


def test_push_to_unreachable_hub_ends_with_a_clear_message(workdir, tmp_path):
    output = tmp_path / "pushed"
    result = run_script(
        workdir,
        "pretrain.py",
        *SMALL_RUN,
        "--max_steps",
        "1",
        "--output_dir",
        str(output),
        "--push_to_hub",
        "--hub_model_id",
        "user/medformer",
        "--hub_token",
        "hf_fake",
        HF_HUB_OFFLINE="0",
        HF_ENDPOINT="http://127.0.0.1:9",
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: Could not push")
    assert (output / "model.safetensors").is_file()  # the folder is complete and can be pushed later


def test_a_subset_evaluation_keeps_only_the_same_evaluations_metrics(tmp_path):
    """evaluate.py merges a subset into the model folder's record only when that record is the same evaluation
    (split, views, image size) of the same weights; an older record of another kind, or of weights since replaced
    (saved over the folder by hand), is replaced, never mixed in under the wrong label."""
    script = load_example("evaluate")
    evaluation = {"split": "test", "test_time_flips": False, "size": 28, "weights": "1f2e3d4c5b6a7988"}
    values = {"acc": 0.5, "auc": 0.6, "samples": 10}
    others = ({**evaluation, "split": "validation"}, {**evaluation, "weights": "0000000000000000"})
    for recorded_as, kept in ((evaluation, {"breastmnist": values}), *((other, {}) for other in others)):
        (tmp_path / "metrics.json").write_text(json.dumps({**recorded_as, "metrics": {"breastmnist": values}}))
        assert script.recorded_metrics(tmp_path, evaluation, ["breastmnist", "organmnist3d"]) == kept
    assert script.recorded_metrics(tmp_path / "nothing_yet", evaluation, ["breastmnist"]) == {}


@pytest.mark.parametrize(
    ("tasks", "recorded", "arguments", "message"),
    [
        ({"organ3d": "organmnist3d"}, {}, [], "the model's tasks ['organ3d'] are not MedMNIST sets"),
        ({"organmnist3d": "organmnist3d"}, {}, ["--datasets", "organ3d"], "--datasets ['organ3d'] are not MedMNIST"),
        (  # a RetinaMNIST head with another label space: its scores cannot be read as MedMNIST's 5 grades
            {"retinamnist": "retinamnist"},
            {"num_labels": 3},
            [],
            "is multiclass with 3 labels, but MedMNIST's retinamnist is ordinal with 5",
        ),
        (  # trained at 64 px, saved without its processor: the config's record asks for --size too
            {"breastmnist": "breastmnist"},
            {"image_size_2d": [64, 64]},
            [],
            "takes images of 64 px (its processor or config), a MedMNIST file size: pass --size 64",
        ),
    ],
    ids=["task-names", "datasets-names", "label-space", "config-size"],
)
def test_evaluate_refuses_what_it_cannot_score_at_start_up(
    tmp_path, monkeypatch, capsys, tasks, recorded, arguments, message
):
    from medformer_hf import MedformerConfig
    from medformer_hf.data import CATALOGUE

    specs = {name: CATALOGUE[source].task_spec() for name, source in tasks.items()}
    if "num_labels" in recorded:
        specs = {name: {**spec, "type": "multiclass", "labels": ["a", "b", "c"]} for name, spec in specs.items()}
    sizes = {key: value for key, value in recorded.items() if key.startswith("image_size")}
    MedformerConfig(tasks=specs, **sizes).save_pretrained(tmp_path)
    script = load_example("evaluate")
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--model", str(tmp_path), "--data_dir", str(DATA_DIR), *arguments])
    with pytest.raises(SystemExit) as stopped:
        script.parse_args()
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_the_tasks_evaluation_can_score_here_are_told_from_the_others():
    from medformer_hf import MedformerConfig
    from medformer_hf.data import CATALOGUE
    from medformer_hf.training import scorable_tasks

    specs = {name: CATALOGUE[name].task_spec() for name in ("breastmnist", "chestmnist", "retinamnist")}
    specs["retinamnist"] = {**specs["retinamnist"], "type": "multiclass"}  # 5 grades as classes: still readable
    specs["organmnist3d"] = {**CATALOGUE["organmnist3d"].task_spec(), "labels": ["liver", "other"]}
    specs["organ3d"] = CATALOGUE["organmnist3d"].task_spec()
    groups = scorable_tasks(MedformerConfig(tasks=specs), 28, DATA_DIR)
    assert groups == {
        "scored": ["breastmnist", "retinamnist"],
        "that are not MedMNIST sets": ["organ3d"],
        "without a local MedMNIST file": ["chestmnist"],
        "whose head MedMNIST's metric cannot read": ["organmnist3d"],
    }


def test_evaluation_reads_a_head_with_its_own_task_type(tmp_path):
    """A RetinaMNIST head trained as 5-way multiclass (MedMNIST's own baselines treat it so) is scored from the softmax
    of its 5 logits, not read as 4 ordinal ones; the figures equal MedMNIST's evaluator on a plain forward pass."""
    from accelerate import Accelerator
    from medmnist.evaluator import getACC, getAUC

    from medformer_hf import MedformerImageProcessor
    from medformer_hf.data import CATALOGUE, MedformerCollator, build_multitask_dataset
    from medformer_hf.training import evaluate_tasks

    from .conftest import make_tiny_config

    torch.manual_seed(0)
    spec = {**CATALOGUE["retinamnist"].task_spec(), "type": "multiclass"}
    model = MedformerForMultiTask(make_tiny_config(tasks={"retinamnist": spec})).eval()
    data = build_multitask_dataset(["retinamnist"], "validation", data_dir=DATA_DIR, cache_dir=tmp_path)
    collator = MedformerCollator(data, MedformerImageProcessor(), ["retinamnist"])
    metrics, predictions = evaluate_tasks(
        Accelerator(cpu=True), model, {"retinamnist": data}, {"retinamnist": collator}, 64
    )
    scores, labels = predictions["retinamnist"]
    batch = collator(data.__getitems__(list(range(len(data)))))
    with torch.no_grad():
        metadata = {key: batch[key] for key in ("modality_ids", "body_part_ids")}
        expected = model(batch["pixel_values"], task="retinamnist", **metadata).logits.softmax(-1).numpy()
    assert scores.shape == (len(data), 5)
    assert metrics["retinamnist"]["auc"] == pytest.approx(
        getAUC(labels[:, None], expected, "ordinal-regression"), abs=1e-6
    )
    assert metrics["retinamnist"]["acc"] == pytest.approx(getACC(labels[:, None], expected, "ordinal-regression"))
