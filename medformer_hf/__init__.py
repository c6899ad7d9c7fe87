"""medformer-hf: Medformer for 2D and 3D medical images in the Hugging Face stack.

Importing the package registers Medformer with the Auto classes, so `AutoModel.from_pretrained(path)` works without
`trust_remote_code` where the package is installed; saved folders also carry the code for machines where it is not.
AutoModelForImageClassification gets both classifiers, and transformers picks by the folder's `architectures`, so a
single-task and a multi-task folder each load as what they hold, in any order. (Left unregistered, transformers
registers the first remote classifier it loads for the shared config class, and every later folder loads as that.)
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)
from transformers.pipelines import PIPELINE_REGISTRY

from . import metrics  # noqa: F401  (`medformer_hf.metrics.MEDMNIST_METRIC_PATH` after `import medformer_hf`)
from .configuration_medformer import UNSPECIFIED_ID, MedformerConfig
from .image_processing_medformer import CT_WINDOWS, MedformerImageProcessor, MedicalImage, load_dicom, load_nifti
from .modeling_medformer import (
    MedformerForImageClassification,
    MedformerForMultiTask,
    MedformerForPreTraining,
    MedformerForPreTrainingOutput,
    MedformerModel,
    MedformerModelOutput,
    MedformerMultiTaskOutput,
    MedformerPreTrainedModel,
    classifier_probabilities,
    multitask_loss,
    task_loss,
    task_probabilities,
)
from .pipeline_medformer import TASK_NAME, MedicalImageClassificationPipeline

AutoConfig.register("medformer", MedformerConfig, exist_ok=True)
AutoModel.register(MedformerConfig, MedformerModel, exist_ok=True)
AutoModelForPreTraining.register(MedformerConfig, MedformerForPreTraining, exist_ok=True)
AutoModelForImageClassification.register(
    MedformerConfig, (MedformerForImageClassification, MedformerForMultiTask), exist_ok=True
)
AutoImageProcessor.register(
    MedformerConfig,
    image_processor_classes={"torchvision": MedformerImageProcessor, "pil": MedformerImageProcessor},
    exist_ok=True,
)

PIPELINE_REGISTRY.register_pipeline(
    TASK_NAME,
    pipeline_class=MedicalImageClassificationPipeline,
    pt_model=AutoModelForImageClassification,
    type="image",
)

__version__ = "0.1.0"

__all__ = [
    "CT_WINDOWS",
    "UNSPECIFIED_ID",
    "MedformerConfig",
    "MedformerImageProcessor",
    "MedicalImage",
    "MedicalImageClassificationPipeline",
    "load_dicom",
    "load_nifti",
    "MedformerForImageClassification",
    "MedformerForMultiTask",
    "MedformerForPreTraining",
    "MedformerForPreTrainingOutput",
    "MedformerModel",
    "MedformerModelOutput",
    "MedformerMultiTaskOutput",
    "MedformerPreTrainedModel",
    "classifier_probabilities",
    "multitask_loss",
    "task_loss",
    "task_probabilities",
]
