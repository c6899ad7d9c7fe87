"""The training recipe: label-safe augmentation from the catalogue, EMA weights, and defaults that learn."""

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from medformer_hf import MedformerConfig, MedformerForMultiTask, MedformerImageProcessor, multitask_loss, task_loss
from medformer_hf.data import (
    CATALOGUE,
    AugmentationPolicy,
    MedformerCollator,
    augment,
    build_multitask_dataset,
    multitask,
)
from medformer_hf.data.catalogue import LABEL_SAFE_AUGMENTATIONS
from medformer_hf.modeling_medformer import MedformerDropPath
from medformer_hf.training import (
    MODEL_SIZES,
    average_weights,
    checkpoint_processor,
    create_ema,
    create_optimizer,
    describe_batch,
    describe_input_size,
    evaluate_tasks,
    greedy_soup,
    mix_within_tasks,
    predict,
    training_processor,
    validation_score,
)

from .conftest import DATA_DIR, load_npz_images


def _allowed_results(image: torch.Tensor, policy: AugmentationPolicy) -> list[torch.Tensor]:
    """Every image the catalogue's transforms can make: any subset of the allowed flips, then any allowed turn."""
    results = []
    for subset in policy.flip_combinations():
        flipped = image.flip([axis + 2 for axis in subset])
        for turns in range(4) if policy.rotate_90 else [0]:
            results.append(flipped.rot90(turns, dims=(-2, -1)))
    return results


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_augmentation_never_applies_what_the_catalogue_forbids(name):
    policy = CATALOGUE[name].augmentation
    shape = (5,) * CATALOGUE[name].spatial_dims
    image = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(1, 1, *shape)
    allowed = _allowed_results(image, policy)
    geometric = AugmentationPolicy(
        flip_axes=policy.flip_axes, rotate_90=policy.rotate_90, max_shift=0, intensity_jitter=0
    )
    hits = torch.zeros(len(allowed))
    for sample in augment(image.expand(300, *image.shape[1:]).clone(), geometric):
        matches = [index for index, result in enumerate(allowed) if torch.equal(sample[None], result)]
        assert matches, f"{name}: augmentation produced a transform its catalogue entry does not allow"
        hits[matches[0]] += 1
    assert hits[0] > 0  # the untouched image is among the outcomes


def test_left_right_labels_are_never_mirrored():
    assert set(LABEL_SAFE_AUGMENTATIONS) == set(CATALOGUE)
    for name in ("organmnist3d", "organamnist", "organcmnist", "organsmnist", "chestmnist", "retinamnist"):
        assert CATALOGUE[name].augmentation.flip_axes == () and not CATALOGUE[name].augmentation.rotate_90
        image = torch.randn(4, 1, *(6,) * CATALOGUE[name].spatial_dims)
        geometric = AugmentationPolicy(**{**vars(CATALOGUE[name].augmentation), "intensity_jitter": 0, "max_shift": 0})
        assert torch.equal(augment(image, geometric), image)


def test_flip_combinations_are_every_subset_of_the_safe_axes_identity_first():
    assert CATALOGUE["fracturemnist3d"].augmentation.flip_combinations() == [
        (),
        (0,),
        (1,),
        (2,),
        (0, 1),
        (0, 2),
        (1, 2),
        (0, 1, 2),
    ]
    assert CATALOGUE["breastmnist"].augmentation.flip_combinations() == [(), (1,)]
    assert CATALOGUE["organmnist3d"].augmentation.flip_combinations() == [()]


class _Viewed(torch.nn.Module):
    """The wrapped model shown each input flipped along `axes` (spatial), its logits scaled (far from 0, so that
    averaging logits instead of probabilities would show)."""

    def __init__(self, model: torch.nn.Module, axes: tuple[int, ...] = (), logit_scale: float = 5.0):
        super().__init__()
        self.model, self.axes, self.logit_scale = model, axes, logit_scale
        self.config = model.config  # its tasks, as `predict` reads them

    def forward(self, pixel_values: torch.Tensor, **kwargs):
        output = self.model(pixel_values.flip([axis + 2 for axis in self.axes]), **kwargs)
        output.logits = output.logits * self.logit_scale
        return output


def test_a_validation_leaves_the_training_random_state_alone(tmp_path):
    """Augmentation, masks and dropout draw from the global torch RNG; a validation that drew from it too would make
    the weights depend on how often a run validates (--checkpointing_steps, which a resume may change)."""
    config = MedformerConfig(**MODEL_SIZES["tiny"], tasks={"breastmnist": CATALOGUE["breastmnist"].task_spec()})
    model = MedformerForMultiTask(config).eval()
    data = build_multitask_dataset(["breastmnist"], "validation", data_dir=DATA_DIR, cache_dir=tmp_path)
    collator = MedformerCollator(data, MedformerImageProcessor.from_model_config(config), ["breastmnist"])
    torch.manual_seed(0)
    before = torch.get_rng_state()
    evaluate_tasks(Accelerator(cpu=True), model, {"breastmnist": data}, {"breastmnist": collator}, batch_size=32)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("name", ["breastmnist", "nodulemnist3d"])
def test_test_time_flips_average_the_probabilities_of_exactly_the_label_safe_views(name, tmp_path):
    torch.manual_seed(0)
    names = [name, "retinamnist"]
    config = MedformerConfig(**MODEL_SIZES["tiny"], tasks={task: CATALOGUE[task].task_spec() for task in names})
    model = MedformerForMultiTask(config).eval()
    processor = MedformerImageProcessor.from_model_config(config)
    accelerator = Accelerator(cpu=True)

    def scores(model: torch.nn.Module, task: str, test_time_flips: bool) -> np.ndarray:
        data = build_multitask_dataset([task], "validation", data_dir=DATA_DIR, cache_dir=tmp_path)
        collator = MedformerCollator(data, processor, names)
        return predict(accelerator, model, data, collator, task, 64, test_time_flips)[0]

    combinations = CATALOGUE[name].augmentation.flip_combinations()  # BreastMNIST 2 views, NoduleMNIST3D 8
    views = [scores(_Viewed(model, axes), name, False) for axes in combinations]
    averaged = scores(_Viewed(model), name, True)
    assert np.abs(views[0] - views[-1]).max() > 1e-3  # an untrained model is not flip-invariant
    np.testing.assert_allclose(averaged, np.mean(views, axis=0), atol=1e-6)
    # The views are closed under each safe flip: a flipped input gives the same average.
    np.testing.assert_allclose(scores(_Viewed(model, combinations[-1]), name, True), averaged, atol=1e-6)
    # Fundus grades are not mirror-safe: one view, the plain scores.
    np.testing.assert_array_equal(scores(model, "retinamnist", True), scores(model, "retinamnist", False))


def test_a_run_at_another_input_size_trains_at_it_saves_it_and_scales_its_shifts(tmp_path, monkeypatch):
    config = MedformerConfig(**MODEL_SIZES["tiny"])
    arguments = argparse.Namespace(size=28, input_size_2d=56, input_size_3d=None)
    processor = training_processor(config, arguments)
    assert (processor.size_2d, processor.size_3d) == ([56, 56], [28, 28, 28])  # 3D keeps the files' size
    # The config records them too, so a processor built from the saved config alone resizes the same way.
    assert (config.image_size_2d, config.image_size_3d) == ([56, 56], [28, 28, 28])
    assert MedformerImageProcessor.from_model_config(MedformerConfig.from_dict(config.to_dict())).size_2d == [56, 56]
    data = build_multitask_dataset(["breastmnist"], "validation", data_dir=DATA_DIR, cache_dir=tmp_path)
    policies = []
    monkeypatch.setattr(multitask, "augment", lambda pixels, policy, generator=None: policies.append(policy) or pixels)
    batch = MedformerCollator(data, processor, augment=True)(data.__getitems__([0, 1, 2]))
    assert batch["pixel_values"].shape == (3, 1, 56, 56)
    stored_policy = CATALOGUE["breastmnist"].augmentation
    assert policies[0].max_shift == 2 * stored_policy.max_shift  # the same share of the image as at 28 px
    assert policies[0].flip_axes == stored_policy.flip_axes
    processor.save_pretrained(tmp_path / "model")
    reloaded = MedformerImageProcessor.from_pretrained(tmp_path / "model")
    assert reloaded(load_npz_images("breastmnist", 2), spatial_dims=2)["pixel_values"].shape[-2:] == (56, 56)
    # Fine-tuning from that checkpoint keeps the size its weights know, unless told otherwise.
    from_checkpoint = argparse.Namespace(size=28, input_size_2d=None, input_size_3d=None, init_from=tmp_path / "model")
    assert training_processor(config, from_checkpoint).size_2d == [56, 56]
    from_checkpoint.input_size_2d = 28
    assert training_processor(config, from_checkpoint).size_2d == [28, 28]
    # A checkpoint saved without its processor: its config's record, not the files' size.
    without_processor = MedformerConfig(**MODEL_SIZES["tiny"], image_size_2d=[56, 56], image_size_3d=[28, 28, 28])
    from_checkpoint = argparse.Namespace(size=28, input_size_2d=None, input_size_3d=None, init_from=tmp_path / "none")
    assert training_processor(without_processor, from_checkpoint).size_2d == [56, 56]
    assert describe_input_size(28, processor) == "28 px, 2D resized to 56x56 px"


def test_a_checkpoint_without_its_processor_is_fed_what_its_config_records_with_a_warning(tmp_path):
    """evaluate.py and extract_task.py feed a folder saved by `model.save_pretrained` alone the processor its config
    describes (its training size), saying so; a saved processor is used as it is."""
    from transformers.testing_utils import CaptureLogger

    from medformer_hf import training

    config = MedformerConfig(**MODEL_SIZES["tiny"], image_size_2d=[56, 56], image_size_3d=[28, 28, 28])
    with CaptureLogger(training.logger) as warned:
        processor = checkpoint_processor(tmp_path, config)
    assert processor.size_2d == [56, 56] and "has no preprocessor_config.json" in warned.out
    MedformerImageProcessor(size_2d=[84, 84]).save_pretrained(tmp_path)
    assert checkpoint_processor(tmp_path, config).size_2d == [84, 84]


def test_fine_tuning_from_a_checkpoint_keeps_the_normalisation_its_weights_learned(tmp_path):
    """Sizes and normalisation come from the `--init_from` processor; the raw data's window is not inherited."""
    config = MedformerConfig(**MODEL_SIZES["tiny"])
    statistics = {"default": [0.5, 0.5], "ct": [0.3, 0.25]}
    MedformerImageProcessor(size_2d=[56, 56], modality_statistics=statistics, window="lung").save_pretrained(tmp_path)
    arguments = argparse.Namespace(size=28, input_size_2d=None, input_size_3d=None, init_from=tmp_path)
    processor = training_processor(config, arguments)
    assert (processor.size_2d, processor.modality_statistics, processor.normalization) == (
        [56, 56],
        statistics,
        "modality",
    )
    assert processor.window is None
    MedformerImageProcessor(normalization="image").save_pretrained(tmp_path)
    assert training_processor(config, arguments).normalization == "image"


def test_the_card_states_the_images_of_an_optimizer_step():
    plain = argparse.Namespace(batch_size=64, gradient_accumulation_steps=1)
    assert describe_batch(plain, 1) == "64 x 1 images"
    accumulated = argparse.Namespace(batch_size=64, gradient_accumulation_steps=4)
    assert describe_batch(accumulated, 2) == "64 x 2 x 4 = 512 images"


def test_shift_and_jitter_keep_shape_and_change_pixels():
    pixels = torch.randn(8, 1, 12, 12, 12)
    out = augment(pixels, AugmentationPolicy())
    assert out.shape == pixels.shape and not torch.equal(out, pixels)
    with pytest.raises(ValueError, match="Flip axes"):
        augment(torch.randn(2, 1, 8, 8), AugmentationPolicy(flip_axes=(2,)))


def test_ema_tracks_the_weights_and_is_what_gets_saved(tmp_path):
    torch.manual_seed(0)
    config = MedformerConfig(**MODEL_SIZES["tiny"], tasks={"x": {"type": "binary", "num_labels": 2}})
    model = MedformerForMultiTask(config)
    ema = create_ema(Accelerator(cpu=True), model, 0.5)
    initial = [p.detach().clone() for p in ema.module.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model(torch.randn(4, 1, 28, 28), labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update_parameters(model)
    averaged = dict(ema.module.named_parameters())
    current = dict(model.named_parameters())
    name = "medformer.main_body.layers.0.mlp.fc1.weight"
    assert not torch.equal(averaged[name], current[name])
    assert not torch.equal(averaged[name], initial[list(current).index(name)])
    ema.module.save_pretrained(tmp_path)
    loaded = MedformerForMultiTask.from_pretrained(tmp_path)
    torch.testing.assert_close(dict(loaded.named_parameters())[name], averaged[name])
    assert create_ema(Accelerator(cpu=True), model, 0.0) is None


def test_averaged_weights_are_the_element_wise_mean_and_only_of_one_architecture():
    tasks = {"x": {"type": "binary", "num_labels": 2}}
    models = []
    for seed, drop_path in ((0, 0.0), (1, 0.1)):  # a training-only field may differ
        torch.manual_seed(seed)
        models.append(
            MedformerForMultiTask(MedformerConfig(**MODEL_SIZES["tiny"], tasks=tasks, drop_path_rate=drop_path))
        )
    averaged = average_weights(models)
    name = "medformer.main_body.layers.0.mlp.fc1.weight"
    first, second = (dict(model.named_parameters())[name].detach() for model in models)
    assert not torch.equal(first, second)
    torch.testing.assert_close(averaged[name], (first + second) / 2)
    assert averaged.keys() == models[0].state_dict().keys()
    models[0].load_state_dict(averaged)  # loads whole: no missing or unexpected weight
    other_tasks = MedformerForMultiTask(MedformerConfig(**MODEL_SIZES["tiny"], tasks={"y": tasks["x"]}))
    with pytest.raises(ValueError, match=r"differs from model 0's in \['task_order', 'tasks'\]"):
        average_weights([models[0], other_tasks])
    wider = MedformerForMultiTask(MedformerConfig(**{**MODEL_SIZES["tiny"], "hidden_size": 96}, tasks=tasks))
    with pytest.raises(ValueError, match="hidden_size"):
        average_weights([models[0], wider])
    with pytest.raises(ValueError, match="at least two models, got 1"):
        average_weights(models[:1])
    models[1].config.image_size_2d = [84, 84]  # recorded by one, not by the other (an older config): compatible
    average_weights(models)
    models[0].config.image_size_2d = [56, 56]
    with pytest.raises(ValueError, match="image_size_2d"):
        average_weights(models)


def test_greedy_soup_keeps_only_the_models_that_raise_the_score():
    """Models join best first, each only if the average's score does not drop: the best model, then a second whose
    average with it scores higher; a far-off third is left out, where the uniform average of all three scores worse."""
    tasks = {"x": {"type": "binary", "num_labels": 2}}
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(MedformerForMultiTask(MedformerConfig(**MODEL_SIZES["tiny"], tasks=tasks)))
    with torch.no_grad():
        for parameter in models[2].parameters():
            parameter.add_(1.0)  # far from the other two
    wider = MedformerForMultiTask(MedformerConfig(**{**MODEL_SIZES["tiny"], "hidden_size": 96}, tasks=tasks))
    name = "medformer.main_body.layers.0.mlp.fc1.weight"
    first, second = (models[index].state_dict()[name].clone() for index in (0, 1))
    optimum = (2 * first + second) / 3  # model 0 is a third of the way from it, their mean a sixth, model 1 two thirds

    def score(weights):
        return -float((weights[name] - optimum).norm())

    kept, weights, best = greedy_soup(models, score)
    assert kept == [0, 1]
    torch.testing.assert_close(weights[name], (first + second) / 2)
    assert best == pytest.approx(-float((first - second).norm()) / 6, rel=1e-4)
    assert score(average_weights(models)) < best
    assert greedy_soup([models[2], models[1]], score)[0] == [1]  # the best alone: the other cannot help
    weights[name].zero_()  # the result is a copy: changing it leaves the models as they were
    torch.testing.assert_close(models[0].state_dict()[name], first)
    with pytest.raises(ValueError, match="hidden_size"):  # refused up front, though it would not be kept
        greedy_soup([*models, wider], score)


def test_default_recipe_learns_a_separable_task_on_real_data():
    """A tiny model with the default init and learning rate leaves the class prior within a few dozen steps
    (linear patches at the old 0.02 init and 1e-3 sat at the prior for 100 epochs): X-ray vs ultrasound."""
    torch.manual_seed(0)
    images = torch.cat([load_npz_images("pneumoniamnist", 96), load_npz_images("breastmnist", 96)])
    labels = torch.cat([torch.zeros(96), torch.ones(96)]).long()
    images = (images - 0.5) / 0.25
    config = MedformerConfig(**MODEL_SIZES["tiny"], tasks={"source": {"type": "binary", "num_labels": 2}})
    model = MedformerForMultiTask(config)
    args = argparse.Namespace(learning_rate=3e-4, weight_decay=0.05, warmup_ratio=0.05, max_steps=40)
    optimizer, scheduler = create_optimizer(model, args, num_processes=1)
    train, held_out = np.arange(0, 192, 2), np.arange(1, 192, 2)
    rng = np.random.default_rng(0)
    for _ in range(args.max_steps):
        batch = rng.choice(train, 32, replace=False)
        model(images[batch], labels=labels[batch]).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    with torch.no_grad():
        predicted = (model.eval()(images[held_out]).logits[:, 0] > 0).long()
    assert (predicted == labels[held_out]).float().mean() > 0.9


def test_label_smoothing_moves_every_target_towards_uniform():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]])
    labels = torch.tensor([0, 1])
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.2)
    assert task_loss(logits, labels, "multiclass", 3, label_smoothing=0.2) == pytest.approx(expected.item())
    # Sigmoid outputs: the target 1 becomes 0.9 and 0 becomes 0.1, so a confident correct logit now costs more.
    confident = torch.tensor([[8.0]])
    plain = task_loss(confident, torch.tensor([1]), "binary", 2)
    smoothed = task_loss(confident, torch.tensor([1]), "binary", 2, label_smoothing=0.2)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(confident[:, 0], torch.tensor([0.9]))
    assert smoothed.item() == pytest.approx(bce.item()) and smoothed > plain
    ordinal = task_loss(torch.tensor([[1.0, -1.0]]), torch.tensor([1]), "ordinal", 3, label_smoothing=0.2)
    targets = torch.tensor([[0.9, 0.1]])
    assert ordinal.item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([[1.0, -1.0]]), targets).item()
    )
    regression = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]])
    assert task_loss(*regression, "regression", 2, label_smoothing=0.2) == task_loss(*regression, "regression", 2)
    with pytest.raises(ValueError, match="label_smoothing"):
        task_loss(logits, labels, "multiclass", 3, label_smoothing=1.0)


def test_multitask_forward_passes_label_smoothing_to_every_task():
    torch.manual_seed(0)
    config = MedformerConfig(**MODEL_SIZES["tiny"], tasks={"x": {"type": "multiclass", "num_labels": 3}})
    model = MedformerForMultiTask(config).eval()
    pixels, labels = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 1])
    smoothed = model(pixels, labels=labels, target_smoothing=0.3)
    assert smoothed.loss.item() == pytest.approx(task_loss(smoothed.logits, labels, "multiclass", 3, 0.3).item())
    assert smoothed.loss != model(pixels, labels=labels).loss


def test_mixup_pairs_each_image_with_one_of_its_own_task_and_blends_by_the_drawn_weight():
    torch.manual_seed(0)
    task_ids = torch.tensor([2, 0, 2, 1, 0, 2, 2, 0])
    pixels = torch.randn(8, 1, 28, 28)
    for _ in range(20):
        mixed, partner, weight = mix_within_tasks(pixels, task_ids, alpha=0.4)
        assert 0.0 < weight < 1.0
        assert (task_ids[partner] == task_ids).all()
        assert sorted(partner.tolist()) == list(range(8))  # every image is some image's partner once
        torch.testing.assert_close(mixed, weight * pixels + (1 - weight) * pixels[partner])
    # The lone image of task 1 can only be paired with itself, so it comes out unchanged.
    assert partner[3] == 3
    torch.testing.assert_close(mixed[3], pixels[3])


def test_multitask_loss_is_the_forward_loss_and_scores_the_same_logits_against_other_labels():
    """The forward's loss is `multitask_loss` of its own logits; against mixup's partner labels the same logits give
    the loss of the mixed targets, which for a sigmoid task is BCE with the blended 0/1 targets (hand-checked)."""
    torch.manual_seed(0)
    tasks = {"kind": {"type": "multiclass", "num_labels": 3}, "sick": {"type": "binary", "num_labels": 2}}
    model = MedformerForMultiTask(MedformerConfig(**MODEL_SIZES["tiny"], tasks=tasks)).eval()
    pixels = torch.randn(5, 1, 28, 28)
    task_ids, labels = torch.tensor([0, 1, 0, 1, 1]), torch.tensor([[2], [1], [0], [0], [1]])
    output = model(pixels, task=task_ids, labels=labels, target_smoothing=0.1)
    loss, per_task = multitask_loss(model.config, output.task_logits, output.task_indices, labels, 0.1)
    assert loss.item() == pytest.approx(output.loss.item()) and per_task.keys() == {"kind", "sick"}
    partner = torch.tensor([2, 3, 0, 1, 4])
    weight = 0.3
    plain, _ = multitask_loss(model.config, output.task_logits, output.task_indices, labels)
    swapped, _ = multitask_loss(model.config, output.task_logits, output.task_indices, labels[partner])
    sick_logits = output.task_logits["sick"][:, 0]
    blended = weight * torch.tensor([1.0, 0.0, 1.0]) + (1 - weight) * torch.tensor([0.0, 1.0, 1.0])
    kind_logits = output.task_logits["kind"]
    kind = weight * F.cross_entropy(kind_logits, torch.tensor([2, 0])) + (1 - weight) * F.cross_entropy(
        kind_logits, torch.tensor([0, 2])
    )
    expected = (2 * kind + 3 * F.binary_cross_entropy_with_logits(sick_logits, blended)) / 5
    assert (weight * plain + (1 - weight) * swapped).item() == pytest.approx(expected.item(), rel=1e-5)


def test_checkpoints_are_kept_on_mean_auc_and_a_saturated_auc_is_broken_by_accuracy():
    early = {"organmnist3d": {"auc": 1.0, "acc": 0.93}, "breastmnist": {"auc": 0.80, "acc": 0.85}}
    later = {"organmnist3d": {"auc": 1.0, "acc": 0.97}, "breastmnist": {"auc": 0.80, "acc": 0.85}}
    assert validation_score(early) == pytest.approx((0.90, 0.89))
    assert validation_score(later) > validation_score(early)  # same AUC, better accuracy: kept
    worse_auc_better_acc = {"organmnist3d": {"auc": 1.0, "acc": 1.0}, "breastmnist": {"auc": 0.79, "acc": 0.9}}
    assert validation_score(worse_auc_better_acc) < validation_score(early)  # AUC comes first


def test_drop_path_rises_with_depth_drops_whole_samples_in_training_and_never_in_evaluation():
    torch.manual_seed(0)
    config = MedformerConfig(**{**MODEL_SIZES["small"], "drop_path_rate": 0.3})
    rates = [layer.drop_path.rate for layer in MedformerForMultiTask(config).medformer.main_body.layers]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="drop_path_rate"):
        MedformerConfig(drop_path_rate=1.0)
    drop = MedformerDropPath(0.5)
    branch = torch.ones(2000, 3, 4)
    dropped = drop.train()(branch)
    per_sample = dropped.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}  # a sample is dropped whole or rescaled whole
    assert (per_sample.std(1) == 0).all() and abs(dropped.mean().item() - 1.0) < 0.1  # expectation kept
    assert torch.equal(drop.eval()(branch), branch)


def test_layer_decay_gives_the_input_the_smallest_rate_and_the_heads_the_full_one():
    config = MedformerConfig(**MODEL_SIZES["small"], tasks={"x": {"type": "binary", "num_labels": 2}})
    model = MedformerForMultiTask(config)
    model.add_task("y", adapter_rank=2, adapt_input=True, type="binary", num_labels=2)
    args = argparse.Namespace(learning_rate=1e-3, weight_decay=0.05, warmup_ratio=0.0, max_steps=10)
    optimizer, _ = create_optimizer(model, args, num_processes=1, layer_decay=0.5)
    rate_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert rate_of[id(named["task_heads.x.projection.weight"])] == pytest.approx(1e-3)
    assert rate_of[id(named["medformer.main_body.layers.3.mlp.fc1.weight"])] == pytest.approx(5e-4)
    assert rate_of[id(named["medformer.main_body.layers.0.mlp.fc1.weight"])] == pytest.approx(1e-3 / 16)
    adapter = named["medformer.task_adapters.y.layers.0.deltas.fc1.down.weight"]
    assert rate_of[id(adapter)] == pytest.approx(1e-3 / 16)  # at its block's depth
    input_adapter = named["medformer.task_adapters.y.input_layers.0.deltas.k_proj.up.weight"]
    assert rate_of[id(input_adapter)] == pytest.approx(1e-3 / 32)  # at the Input Adaptformer's
    assert rate_of[id(named["medformer.input_adaptformer.latents"])] == pytest.approx(1e-3 / 32)
    assert len(rate_of) == len(named)  # every parameter trains, once
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    assert id(named["medformer.input_adaptformer.latents"]) not in decayed
    assert id(named["medformer.main_body.layers.0.mlp.fc1.weight"]) in decayed
    plain, _ = create_optimizer(model, args, num_processes=1)
    assert {group["lr"] for group in plain.param_groups} == {1e-3}
    # Without layer decay: [decayed, not decayed], the layout of checkpoints saved before the option (resumable).
    assert [group["weight_decay"] for group in plain.param_groups] == [0.05, 0.0]
