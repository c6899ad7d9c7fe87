import math

import pytest
import torch
import torch.nn.functional as F

from medformer_hf import (
    MedformerConfig,
    MedformerForImageClassification,
    MedformerForMultiTask,
    MedformerForPreTraining,
    MedformerImageProcessor,
    MedformerModel,
    task_loss,
    task_probabilities,
)
from medformer_hf.modeling_medformer import patchify, unpatchify

from .conftest import make_tiny_config

SHAPES = [(2, 1, 28, 28), (2, 1, 64, 64), (2, 3, 28, 28), (2, 3, 224, 224), (2, 1, 28, 28, 28), (2, 1, 64, 64, 64)]


def test_one_model_reads_every_size_and_kind(tiny_config):
    model = MedformerModel(tiny_config).eval()
    for shape in SHAPES:
        output = model(torch.randn(shape))
        assert output.last_hidden_state.shape == (2, tiny_config.num_latents, tiny_config.hidden_size), shape
        assert output.pooler_output.shape == (2, tiny_config.hidden_size)
        assert torch.isfinite(output.last_hidden_state).all()


@pytest.mark.parametrize("field", ["modality_ids", "body_part_ids"])
def test_context_ids_change_the_output(tiny_config, field):
    model = MedformerModel(tiny_config).eval()
    pixels = torch.randn(2, 1, 28, 28)
    first = model(pixels, **{field: torch.tensor([1, 1])}).last_hidden_state
    second = model(pixels, **{field: torch.tensor([2, 2])}).last_hidden_state
    assert (first - second).abs().max() > 1e-3


def test_dimensionality_embedding_is_used(tiny_config):
    context = MedformerModel(tiny_config).input_adaptformer.context_embeddings
    ids = torch.zeros(1, dtype=torch.long)
    assert not torch.allclose(context(2, ids, ids), context(3, ids, ids))


def test_hidden_states_and_attentions(tiny_config):
    model = MedformerModel(tiny_config).eval()
    pixels = torch.randn(2, 1, 28, 28)
    output = model(pixels, output_hidden_states=True, output_attentions=True)
    assert len(output.hidden_states) == 1 + tiny_config.num_hidden_layers
    cross, *body = output.attentions
    assert cross.shape == (2, tiny_config.num_cross_attention_heads, tiny_config.num_latents, 49)
    assert body[0].shape == (2, tiny_config.num_attention_heads, tiny_config.num_latents, tiny_config.num_latents)
    torch.testing.assert_close(cross.sum(-1), torch.ones(cross.shape[:-1]))
    # The explicit path that returns weights computes the same latents as SDPA.
    torch.testing.assert_close(output.last_hidden_state, model(pixels).last_hidden_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 8, 12), (2, 1, 8, 4, 12)])
def test_patchify_round_trip_and_order(shape):
    pixels = torch.randn(shape)
    patches = patchify(pixels, 4)
    assert patches.shape == (2, math.prod(s // 4 for s in shape[2:]), shape[1] * 4 ** (len(shape) - 2))
    torch.testing.assert_close(unpatchify(patches, shape, 4), pixels)
    # Patch 1 is the second patch along the last axis, channels last within a patch.
    index = (0, slice(None), *[slice(0, 4)] * (len(shape) - 3), slice(4, 8))
    second = pixels[index]
    torch.testing.assert_close(patches[0, 1], second.movedim(0, -1).reshape(-1))


def test_masking_keeps_the_lowest_noise_patches(tiny_config):
    model = MedformerModel(tiny_config).eval()
    noise = torch.rand(2, 49)
    output = model(torch.randn(2, 1, 28, 28), noise=noise)
    kept = int(49 * (1 - tiny_config.mask_ratio))
    assert output.mask.sum(1).tolist() == [49 - kept] * 2
    assert torch.equal(output.mask[0] == 0, noise[0] <= noise[0].sort().values[kept - 1])


@pytest.mark.parametrize("shape", [(3, 1, 32, 32), (3, 1, 28, 28), (3, 1, 28, 28, 28)])
def test_mask_unit_keeps_or_drops_whole_blocks(shape):
    torch.manual_seed(0)
    model = MedformerModel(make_tiny_config(mask_unit=2)).eval()
    mask = model(torch.randn(shape), mask_ratio=0.75).mask
    grid = tuple(size // 4 for size in shape[2:])
    num_patches = math.prod(grid)
    assert mask.sum(1).tolist() == [num_patches - int(num_patches * 0.25)] * shape[0]
    # Every 2x2(x2) block (edge blocks of a 7-patch axis are smaller) is kept or dropped whole, but for at most one
    # block per image, which the patch count splits.
    block_of_patch = torch.stack(torch.meshgrid(*[torch.arange(n) // 2 for n in grid], indexing="ij")).flatten(1)
    block_ids = sum(coordinate * 4**axis for axis, coordinate in enumerate(block_of_patch))
    for row in mask:
        split = [block for block in block_ids.unique() if row[block_ids == block].unique().numel() > 1]
        assert len(split) <= 1, split
    assert not torch.equal(mask[0], mask[1])


# ------------------------------------------------------------------------------------------ losses against references


def test_multiclass_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    expected = (-math.log(math.e**2 / (math.e**2 + math.e + 1)) - math.log(math.e**3 / (2 + math.e**3))) / 2
    assert task_loss(logits, torch.tensor([0, 2]), "multiclass", 3).item() == pytest.approx(expected, rel=1e-6)


def test_binary_loss_matches_hand_computation():
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = (-math.log(sigmoid(0.5)) - math.log(1 - sigmoid(-1.0))) / 2
    loss = task_loss(torch.tensor([[0.5], [-1.0]]), torch.tensor([1, 0]), "binary", 2)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_ordinal_loss_matches_hand_computation():
    # 3 levels -> 2 cumulative logits: P(y > 0), P(y > 1). Label 1 means targets (1, 0).
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = (-math.log(sigmoid(1.0)) - math.log(1 - sigmoid(-2.0))) / 2
    loss = task_loss(torch.tensor([[1.0, -2.0]]), torch.tensor([1]), "ordinal", 3)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_multilabel_loss_matches_hand_computation():
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = (-math.log(sigmoid(2.0)) - math.log(1 - sigmoid(0.0))) / 2
    loss = task_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]]), "multilabel", 2)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_regression_loss_matches_hand_computation():
    loss = task_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]]), "regression", 2)
    assert loss.item() == pytest.approx((1 + 4) / 2)
    # Under bf16 autocast the targets keep their float32 values (bf16 would make 150.3 into 150.0).
    targets = torch.tensor([[150.3, 37.2]])
    loss = task_loss(torch.tensor([[150.0, 37.0]], dtype=torch.bfloat16), targets, "regression", 2)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx((0.3**2 + 0.2**2) / 2, rel=1e-3)


def test_a_mask_ratio_outside_0_1_is_refused_and_one_given_is_used(tiny_config):
    model = MedformerModel(tiny_config)
    pixels = torch.randn(2, 1, 16, 16)
    for ratio in (0.0, 1.0):
        with pytest.raises(ValueError, match="mask_ratio must be in \\(0, 1\\)"):
            model(pixels, mask_ratio=ratio)
    assert model(pixels, mask_ratio=0.25).mask.float().mean().item() == pytest.approx(0.25)


def test_ordinal_probabilities_are_a_distribution():
    probabilities = task_probabilities(torch.tensor([[3.0, 0.0, -3.0], [-1.0, 2.0, 0.0]]), "ordinal")
    assert probabilities.shape == (2, 4)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(2))
    assert (probabilities >= 0).all()
    assert torch.equal(task_probabilities(torch.tensor([[0.0]]), "binary"), torch.tensor([[0.5, 0.5]]))


@pytest.mark.parametrize("task_type", ["binary-class", "multi-class", "ordinal-regression", "foo"])
def test_task_probabilities_refuse_a_task_type_they_do_not_know(task_type):
    """MedMNIST's own names ("binary-class", ...) once fell through to regression: logits passed as probabilities."""
    with pytest.raises(ValueError, match=f"Unknown task type '{task_type}'; choose one of"):
        task_probabilities(torch.tensor([[0.3, -1.0, 2.0]]), task_type)
    with pytest.raises(ValueError, match="logits must be \\(batch, outputs\\), got shape \\(2,\\)"):
        task_probabilities(torch.tensor([0.3, 0.5]), "binary")


def test_multitask_loss_is_the_sample_weighted_mean_of_task_losses(tiny_config):
    model = MedformerForMultiTask(tiny_config).eval()
    pixels = torch.randn(5, 1, 28, 28)
    names = list(tiny_config.tasks)
    assert names == ["pneumonia", "organ", "retina", "chest", "age"]  # ids index the tasks in the order given
    task_ids = torch.tensor([names.index(name) for name in ("pneumonia", "organ", "organ", "pneumonia", "organ")])
    labels = torch.tensor([[1], [7], [3], [0], [10]])
    mixed = model(pixels, task=task_ids, labels=labels)
    assert mixed.logits is None and set(mixed.task_logits) == {"pneumonia", "organ"}
    assert mixed.task_indices["organ"].tolist() == [1, 2, 4]
    expected = (
        2 * task_loss(mixed.task_logits["pneumonia"], torch.tensor([1, 0]), "binary", 2)
        + 3 * task_loss(mixed.task_logits["organ"], torch.tensor([7, 3, 10]), "multiclass", 11)
    ) / 5
    torch.testing.assert_close(mixed.loss, expected)
    # The same samples alone, as single-task batches, give the same logits.
    alone = model(pixels[[1, 2, 4]], task="organ")
    torch.testing.assert_close(alone.logits, mixed.task_logits["organ"], atol=1e-5, rtol=1e-5)


def test_multitask_output_widths(tiny_config):
    model = MedformerForMultiTask(tiny_config).eval()
    widths = {"pneumonia": 1, "organ": 11, "retina": 4, "chest": 3, "age": 2}
    for name, width in widths.items():
        assert model(torch.randn(2, 1, 28, 28), task=name).logits.shape == (2, width)


@pytest.mark.parametrize("in_config", [False, True])
@pytest.mark.parametrize(
    "model_class", [MedformerModel, MedformerForMultiTask, MedformerForImageClassification, MedformerForPreTraining]
)
def test_return_dict_false_gives_transformers_tuples(model_class, in_config):
    """As every transformers model: `return_dict=False` (or `config.return_dict = False`) gives
    `output.to_tuple()`; the models that wrap `MedformerModel` still read its output by name."""
    torch.manual_seed(0)
    model = model_class(make_tiny_config()).eval()
    inputs = {"pixel_values": torch.rand(2, 1, 28, 28)}
    if model_class is MedformerForMultiTask:
        inputs.update(task="pneumonia", labels=torch.tensor([0, 1]))
    if model_class is MedformerForImageClassification:
        inputs["labels"] = torch.tensor([0, 1])
    if model_class is MedformerForPreTraining:
        inputs["noise"] = torch.rand(4, 49)  # two masked views of each image
    expected = model(**inputs).to_tuple()
    if in_config:
        model.config.return_dict = False
    outputs = model(**inputs) if in_config else model(**inputs, return_dict=False)
    assert isinstance(outputs, tuple) and len(outputs) == len(expected)
    torch.testing.assert_close(outputs[0], expected[0])


def test_multitask_defaults_context_to_the_task(tiny_config):
    model = MedformerForMultiTask(tiny_config).eval()
    pixels = torch.randn(2, 1, 28, 28)
    xray = tiny_config.modality_names.index("xray")
    chest = tiny_config.body_part_names.index("chest")
    implicit = model(pixels, task="pneumonia").logits
    ids = {"modality_ids": torch.tensor([xray] * 2), "body_part_ids": torch.tensor([chest] * 2)}
    explicit = model(pixels, task="pneumonia", **ids)
    torch.testing.assert_close(implicit, explicit.logits)


def test_image_classification_uses_transformers_conventions():
    config = make_tiny_config(tasks=None, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    model = MedformerForImageClassification(config).eval()
    labels = torch.tensor([0, 2])
    output = model(torch.randn(2, 3, 28, 28), labels=labels)
    assert output.logits.shape == (2, 3)
    assert config.problem_type == "single_label_classification"
    torch.testing.assert_close(output.loss, F.cross_entropy(output.logits, labels))


# ------------------------------------------------------------------------------------------ weights and training


def test_add_task_on_a_loaded_checkpoint_keeps_every_weight(tiny_config, tmp_path):
    MedformerForMultiTask(tiny_config).save_pretrained(tmp_path)
    model = MedformerForMultiTask.from_pretrained(tmp_path)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.add_task("derma", type="multiclass", num_labels=7, modality="dermatoscopy", body_part="skin")
    after = model.state_dict()
    new_keys = {f"task_heads.derma.{name}" for name in ("queries", "projection.weight", "projection.bias")}
    assert set(after) - set(before) == new_keys
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    assert model(torch.randn(2, 3, 28, 28), task="derma").logits.shape == (2, 7)
    # A private Output Adaptformer added to a frozen model trains (a copy of the frozen shared one would not).
    model.requires_grad_(False)
    model.add_task("path", private_output=True, type="multiclass", num_labels=9, modality="pathology")
    private = model.private_output_adaptformers["path"]
    assert all(parameter.requires_grad for parameter in private.parameters())
    assert not any(parameter.requires_grad for parameter in model.output_adaptformer.parameters())
    # New labels through from_pretrained would change no head (and AutoModelForImageClassification resolves here).
    with pytest.raises(ValueError, match=r"\['id2label', 'num_labels'\] change no head of a MedformerForMultiTask"):
        MedformerForMultiTask.from_pretrained(tmp_path, num_labels=3, id2label={0: "a", 1: "b", 2: "c"})
    # The grown model saves and reloads with its new task.
    model.save_pretrained(tmp_path / "grown")
    reloaded = MedformerForMultiTask.from_pretrained(tmp_path / "grown")
    assert torch.equal(reloaded.task_heads["derma"].queries, model.task_heads["derma"].queries)


def test_task_ids_stay_stable_when_a_task_is_added(tiny_config, tmp_path):
    """Per-sample task ids are the mixed-batch API: a new task, even one whose name sorts first, is appended."""
    MedformerForMultiTask(tiny_config).save_pretrained(tmp_path)
    model = MedformerForMultiTask.from_pretrained(tmp_path).eval()
    before = list(model.config.tasks)
    pixels = torch.rand(2, 1, 28, 28)
    ids = torch.tensor([before.index("pneumonia"), before.index("chest")])
    with torch.no_grad():
        expected = model(pixels, task=ids).task_logits
        model.add_task("aaa_first_by_name", type="binary", labels=["no", "yes"])
        grown = model(pixels, task=ids).task_logits
    assert list(model.config.tasks) == [*before, "aaa_first_by_name"]
    assert grown.keys() == expected.keys() and all(torch.equal(grown[k], expected[k]) for k in expected)
    model.save_pretrained(tmp_path / "grown")
    assert list(MedformerForMultiTask.from_pretrained(tmp_path / "grown").config.tasks) == list(model.config.tasks)


def test_save_and_load_restore_every_parameter_and_buffer(tiny_config, tmp_path):
    model = MedformerForPreTraining(tiny_config)
    model.save_pretrained(tmp_path)
    loaded = MedformerForPreTraining.from_pretrained(tmp_path)
    original = dict(model.state_dict())
    assert set(loaded.state_dict()) == set(original)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("model_class", [MedformerForMultiTask, MedformerForPreTraining])
@pytest.mark.parametrize("shape", [(3, 1, 28, 28), (3, 1, 16, 16, 16)])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_config, model_class, shape):
    model = model_class(tiny_config).train()
    pixels = torch.randn(shape)
    kwargs = {"task": "organ", "labels": torch.tensor([1, 5, 9])} if model_class is MedformerForMultiTask else {}
    if model_class is MedformerForPreTraining:
        kwargs["noise"] = torch.rand(6, math.prod(s // 4 for s in shape[2:]))

    def loss_and_grads():
        model.zero_grad()
        loss = model(pixels, **kwargs).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.medformer.main_body.layers)
    checkpointed_loss, checkpointed_grads = loss_and_grads()
    torch.testing.assert_close(checkpointed_loss, loss, atol=1e-5, rtol=1e-5)
    assert checkpointed_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (torch.randn(1, 28, 28), "rank 3"),
        (torch.randn(2, 2, 28, 28), "no 2D patch embedding for 2-channel"),
        (torch.randn(2, 3, 28, 28, 28), "no 3D patch embedding for 3-channel"),
        (torch.randn(2, 1, 30, 28), "not a multiple of the 2D patch size 4"),
        (torch.randint(0, 255, (2, 1, 28, 28)), "floating point"),
        (torch.full((2, 1, 28, 28), float("nan")), "NaN"),
    ],
)
def test_bad_pixels_raise_clear_errors(tiny_config, pixels, message):
    with pytest.raises(ValueError, match=message):
        MedformerModel(tiny_config)(pixels)


def test_bad_task_and_labels_raise_clear_errors(tiny_config):
    model = MedformerForMultiTask(tiny_config)
    pixels = torch.randn(2, 1, 28, 28)
    with pytest.raises(ValueError, match="Unknown task 'liver'; known tasks"):
        model(pixels, task="liver")
    with pytest.raises(ValueError, match="pass task=<name>"):
        model(pixels)
    with pytest.raises(ValueError, match=r"labels \[11\] outside 0..10"):
        model(pixels, task="organ", labels=torch.tensor([3, 11]))
    with pytest.raises(ValueError, match=r"labels \[2\] outside 0..1"):
        model(pixels, task="pneumonia", labels=torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="0/1 labels"):
        model(pixels, task="chest", labels=torch.tensor([[0.0, 0.5, 1.0]] * 2))
    with pytest.raises(ValueError, match="modality_ids has ids outside"):
        model(pixels, task="organ", modality_ids=torch.tensor([0, 99]))


def test_a_task_with_its_own_output_adaptformer_changes_no_other_task(tiny_config, tmp_path):
    model = MedformerForMultiTask(tiny_config).eval()
    pixels = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        before = {task: model(pixels, task=task).logits for task in ("pneumonia", "chest")}
        model.add_task("derma", private_output=True, type="multiclass", num_labels=7)
        shared_reader = model._read_task(
            model.task_heads["derma"], model.output_adaptformer, *_latents_and_context(model, pixels)
        )
        assert torch.equal(model(pixels, task="derma").logits, shared_reader)  # starts as a copy of the shared one
        for parameter in model.private_output_adaptformers["derma"].parameters():
            parameter.add_(0.1)  # as training would move it
        for task, logits in before.items():
            assert torch.equal(model(pixels, task=task).logits, logits), task
        assert not torch.equal(model(pixels, task="derma").logits, shared_reader)
    model.save_pretrained(tmp_path)
    reloaded = MedformerForMultiTask.from_pretrained(tmp_path).eval()
    classifier = MedformerForImageClassification.from_multi_task(reloaded, "derma")
    with torch.no_grad():
        torch.testing.assert_close(classifier(pixels).logits, model(pixels, task="derma").logits)


def test_a_classifier_reloaded_with_new_labels_drops_its_old_task_entry(tiny_config, tmp_path):
    """A taken-out task (CT organs, 11 classes) re-headed for 5 new labels: the old entry would keep conditioning on CT
    and checking the old task's images; it goes, with a warning. Reloaded as it is, the entry stays."""
    classifier = MedformerForImageClassification.from_multi_task(MedformerForMultiTask(tiny_config), "organ")
    classifier.save_pretrained(tmp_path)
    assert list(MedformerForImageClassification.from_pretrained(tmp_path).config.tasks) == ["organ"]
    labels = {index: f"grade {index}" for index in range(5)}
    relabelled = MedformerForImageClassification.from_pretrained(
        tmp_path, num_labels=5, id2label=labels, ignore_mismatched_sizes=True
    )
    assert relabelled.config.tasks == {} and relabelled(torch.randn(2, 1, 16, 16, 16)).logits.shape == (2, 5)


def _latents_and_context(model, pixels):
    output = model.medformer(
        pixels,
        modality_ids=torch.zeros(len(pixels), dtype=torch.long),
        body_part_ids=torch.zeros(len(pixels), dtype=torch.long),
    )
    return output.last_hidden_state, output.context_embedding


@pytest.mark.parametrize("adapt_input", [False, True])
def test_a_task_with_adapters_changes_no_other_task(tiny_config, tmp_path, adapt_input):
    model = MedformerForMultiTask(tiny_config).eval()
    pixels = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        before = {task: model(pixels, task=task).logits for task in ("pneumonia", "chest")}
        model.add_task("derma", adapter_rank=2, adapt_input=adapt_input, type="multiclass", num_labels=7)
        assert model.config.adapter_tasks == {"derma": 2}
        assert model.config.input_adapter_tasks == (["derma"] if adapt_input else [])
        adapter = model.medformer.task_adapters["derma"]
        assert len(adapter.input_layers) == (tiny_config.num_input_layers if adapt_input else 0)
        plain_body = model._read_task(
            model.task_heads["derma"], model.output_adaptformer, *_latents_and_context(model, pixels)
        )
        assert torch.equal(model(pixels, task="derma").logits, plain_body)  # adapters start at zero
        for parameter in adapter.layers.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))  # as training would move them
        body_only = model(pixels, task="derma").logits
        assert not torch.equal(body_only, plain_body)
        for parameter in adapter.input_layers.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        adapted = model(pixels, task="derma").logits
        assert torch.equal(adapted, body_only) != adapt_input  # the input adapters act only where asked
        for task, logits in before.items():
            assert torch.equal(model(pixels, task=task).logits, logits), task
        # A batch mixing tasks with and without adapters gives each sample what its task alone gives.
        names = list(model.config.tasks)
        task_ids = torch.tensor([names.index("derma"), names.index("pneumonia"), names.index("derma"), 0])
        mixed = model(pixels, task=task_ids, output_hidden_states=True)
        torch.testing.assert_close(mixed.task_logits["derma"], adapted[[0, 2]])
        torch.testing.assert_close(mixed.task_logits["pneumonia"], before["pneumonia"][[1, 3]])
        alone = model(pixels, task="derma", output_hidden_states=True, output_attentions=True)
        mixed = model(pixels, task=task_ids, output_hidden_states=True, output_attentions=True)
        pairs = zip(mixed.hidden_states + mixed.attentions, alone.hidden_states + alone.attentions, strict=True)
        for merged, single in pairs:
            torch.testing.assert_close(merged[[0, 2]], single[[0, 2]])
    model.save_pretrained(tmp_path)
    reloaded = MedformerForMultiTask.from_pretrained(tmp_path).eval()
    assert reloaded.config.adapter_tasks == {"derma": 2}
    assert reloaded.config.input_adapter_tasks == model.config.input_adapter_tasks
    classifier = MedformerForImageClassification.from_multi_task(reloaded, "derma")  # adapters merged into weights
    assert classifier.config.adapter_tasks == {} and not list(classifier.medformer.task_adapters)
    assert classifier.config.input_adapter_tasks == []
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels, task="derma").logits, adapted)
        torch.testing.assert_close(classifier(pixels).logits, adapted, atol=1e-5, rtol=1e-4)
        plain = MedformerForImageClassification.from_multi_task(reloaded, "pneumonia")
        torch.testing.assert_close(plain(pixels).logits[:, 1], before["pneumonia"][:, 0])
    with pytest.raises(ValueError, match="adapter_rank must be a positive integer"):
        model.add_task("blood", adapter_rank=-1, type="multiclass", num_labels=8)
    with pytest.raises(ValueError, match="give an adapter_rank"):
        model.add_task("blood", adapt_input=True, type="multiclass", num_labels=8)
    with pytest.raises(ValueError, match=r"input_adapter_tasks names \['chest'\], which have no rank"):
        MedformerConfig(**{**tiny_config.to_dict(), "input_adapter_tasks": ["chest"]})
    with pytest.raises(ValueError, match=r"No adapters for tasks \['pneumonia'\]"):
        model.medformer(pixels, adapter_rows={"pneumonia": torch.arange(4)})


@pytest.mark.parametrize("reentrant", [False, True])
def test_adapters_of_a_frozen_model_get_gradients_with_gradient_checkpointing(tiny_config, reentrant):
    model = MedformerForMultiTask(tiny_config)
    model.add_task("derma", adapter_rank=2, adapt_input=True, type="multiclass", num_labels=7)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith(("medformer.task_adapters.", "task_heads.derma."))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    model(torch.rand(3, 1, 28, 28), task="derma", labels=torch.tensor([0, 3, 6])).loss.backward()
    downs = [p.grad for n, p in model.named_parameters() if n.startswith("medformer.task_adapters.") and "up." in n]
    assert downs and all(grad is not None and grad.abs().max() > 0 for grad in downs)


def test_an_input_at_another_size_than_the_recorded_training_size_is_named_once(tiny_config):
    """Any size runs, but a checkpoint answers worse away from the size it learned (the released one: OrganMNIST3D
    ACC 0.95 at 28^3, 0.47 at 64^3, measured in a fresh-clone trial): a hand-built processor must not hide that."""
    from transformers.testing_utils import CaptureLogger

    from medformer_hf import modeling_medformer

    tiny_config.image_size_2d = [20, 20]
    model = MedformerModel(tiny_config).eval()
    with torch.no_grad(), CaptureLogger(modeling_medformer.logger) as trained_size:
        model(torch.rand(2, 1, 20, 20))
    assert trained_size.out == ""
    with torch.no_grad(), CaptureLogger(modeling_medformer.logger) as other_size:
        model(torch.rand(2, 1, 36, 36))
        model(torch.rand(2, 1, 36, 36))
    assert other_size.out.count("2D input of spatial size (36, 36), but this model was trained at (20, 20)") == 1
    assert "MedformerImageProcessor.from_pretrained(<model folder>)" in other_size.out


def test_training_at_a_new_size_records_it_so_the_saved_model_knows_it(tiny_config, tmp_path):
    """Fine-tuning at another size than the checkpoint's (Trainer, a custom loop) must leave a checkpoint that knows
    the new size: its processor built from the config resizes to it, and it does not warn at it."""
    from transformers.testing_utils import CaptureLogger

    from medformer_hf import modeling_medformer

    tiny_config.image_size_2d = [20, 20]
    model = MedformerForImageClassification(tiny_config)
    with torch.no_grad():  # a forward that trains nothing (e.g. dropout at inference) records nothing
        model(torch.rand(2, 1, 28, 28))
    model(torch.rand(2, 1, 28, 28))  # nor does a shape check in training mode that no backward follows
    assert model.config.image_size_2d == [20, 20]
    with CaptureLogger(modeling_medformer.logger) as training:
        model(torch.rand(2, 1, 36, 36), labels=torch.tensor([0, 1])).loss.backward()
    assert "trained at" not in training.out
    assert (model.config.image_size_2d, model.config.image_size_3d) == ([36, 36], None)  # 3D: still not recorded
    model.save_pretrained(tmp_path)
    reloaded = MedformerForImageClassification.from_pretrained(tmp_path).eval()
    assert MedformerImageProcessor.from_model_config(reloaded.config).size_2d == [36, 36]
    with torch.no_grad(), CaptureLogger(modeling_medformer.logger) as inference:
        reloaded(torch.rand(2, 1, 36, 36))
    assert inference.out == ""
    reloaded.train().medformer.requires_grad_(False)  # only the head trains: its logits take the gradient
    reloaded(torch.rand(2, 1, 44, 44), labels=torch.tensor([0, 1])).loss.backward()
    assert reloaded.config.image_size_2d == [44, 44]


def test_pre_training_records_its_2d_size_not_that_of_the_slices_of_its_volumes():
    """Slice consistency feeds each volume's 2D slices through the encoder beside the model's own 2D images: the
    slices (16 x 16 here) are neither the 2D size it trains for (32) nor a size to warn about."""
    from transformers.testing_utils import CaptureLogger

    from medformer_hf import modeling_medformer

    config = make_tiny_config(ssl_tasks=["masked_reconstruction", "slice_consistency"], image_size_2d=[32, 32])
    model = MedformerForPreTraining(config)
    with CaptureLogger(modeling_medformer.logger) as logged:
        model(torch.rand(4, 1, 16, 16, 16)).loss.backward()
        assert (config.image_size_2d, config.image_size_3d) == ([32, 32], [16, 16, 16])
        model.eval()(torch.rand(4, 1, 16, 16, 16))  # validation: the slices are not warned about either
    assert "trained at" not in logged.out
