"""Real medical files bundled with pydicom and nibabel (and Debian's mricron-data where installed).

None of these files is copied into the project: the tests find them in the installed packages.
"""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medformer_hf import MedformerImageProcessor, MedformerModel, load_dicom, load_nifti
from medformer_hf.configuration_medformer import orientation_problem

from .conftest import make_tiny_config

pydicom = pytest.importorskip("pydicom")
nibabel = pytest.importorskip("nibabel")
from pydicom.data import get_testdata_file  # noqa: E402

NIBABEL_DATA = Path(nibabel.__file__).parent / "tests" / "data"
MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")


def _through_model(image, config, **processor_kwargs):
    """The loaded file goes into the processor as it is: it carries its layout, modality and body part."""
    processor = MedformerImageProcessor.from_model_config(config)
    inputs = processor(image, **processor_kwargs)
    for field, vocabulary in (("modality", config.modality_names), ("body_part", config.body_part_names)):
        name = getattr(image, field)  # a tag the file lacks is "not given" (-1): the model falls back to the task's
        assert inputs[f"{field}_ids"].item() == (-1 if name == "unknown" else vocabulary.index(name))
    output = MedformerModel(config).eval()(**inputs)
    assert torch.isfinite(output.last_hidden_state).all()
    return inputs


@pytest.mark.parametrize(
    ("name", "modality", "body_part", "kwargs"),
    [
        ("CT_small.dcm", "ct", "unknown", {"window": "soft_tissue"}),
        ("MR_small.dcm", "mri", "unknown", {"normalization": "image", "rescale_range": [0, 4096]}),
        ("examples_overlay.dcm", "mri", "abdomen", {"normalization": "image", "rescale_range": [0, 4096]}),
        ("examples_rgb_color.dcm", "ultrasound", "unknown", {"rescale_range": [0, 255]}),
    ],
)
def test_bundled_dicom_files_load_with_their_tags(name, modality, body_part, kwargs):
    image = load_dicom(get_testdata_file(name))
    assert (image.modality, image.body_part) == (modality, body_part)
    config = make_tiny_config()
    inputs = _through_model(image, config, size_2d=[64, 64], **kwargs)
    assert inputs.modality_ids.item() == (-1 if modality == "unknown" else config.modality_names.index(modality))


def test_ct_dicom_comes_out_in_hounsfield_units():
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    image = load_dicom(get_testdata_file("CT_small.dcm"))
    expected = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    np.testing.assert_array_equal(image.array, expected)
    assert float(dataset.RescaleIntercept) == -1024 and image.array.min() < 0


@pytest.mark.parametrize("positions", [[20.0, 0.0, 10.0, 30.0], [10.0, 0.0, 20.0]], ids=["4-slices", "3-slices"])
def test_a_folder_of_dicom_slices_stacks_by_position(tmp_path, positions):
    """Slices written out of order come back sorted; 3 slices stay a volume (not an RGB image)."""
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for order, z in enumerate(positions):
        dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        dataset.ImagePositionPatient = [source.ImagePositionPatient[0], source.ImagePositionPatient[1], z]
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        arr = dataset.pixel_array.copy()
        arr[0, 0] = int(z)  # marks the slice
        dataset.PixelData = arr.tobytes()
        dataset.save_as(tmp_path / f"slice_{order}.dcm")
    (tmp_path / ".DS_Store").write_bytes(b"\0Bud1")  # what a Mac leaves in a copied folder: skipped
    volume = load_dicom(tmp_path)
    assert volume.array.shape == (len(positions), 128, 128) and volume.modality == "ct"
    marks = volume.array[:, 0, 0] - float(source.RescaleIntercept)
    assert marks.tolist() == sorted(positions)
    assert volume.spacing[0] == 10.0
    inputs = _through_model(volume, make_tiny_config(), window="lung", size_3d=[8, 32, 32])
    assert inputs.pixel_values.shape == (1, 1, 8, 32, 32)


def test_bundled_nifti_loads_and_runs(tmp_path):
    image = load_nifti(NIBABEL_DATA / "anatomical.nii", modality="mri", body_part="brain")
    # NIfTI's (x, y, z) = (33, 41, 25) comes out as (D, H, W) = (z, y, x).
    assert image.array.shape == (25, 41, 33) and image.spatial_dims == 3 and image.spacing is not None
    _through_model(image, make_tiny_config(), normalization="image", size_3d=[16, 16, 16])
    series = load_nifti(NIBABEL_DATA / "example4d.nii.gz", volume=1)
    assert series.array.ndim == 3 and series.modality == "unknown"
    with pytest.raises(ValueError, match="volume=<index>"):
        load_nifti(NIBABEL_DATA / "example4d.nii.gz")
    with pytest.raises(ValueError, match=r"volume=9 is out of range: .* holds volumes 0 to 1"):
        load_nifti(NIBABEL_DATA / "example4d.nii.gz", volume=9)
    with pytest.raises(ValueError, match=r"volume=1 picks a volume of a 4D series, but .* holds one \(33, 41, 25\)"):
        load_nifti(NIBABEL_DATA / "anatomical.nii", volume=1)  # a 3D file: volume= was silently ignored
    with pytest.raises(FileNotFoundError, match="No NIfTI file"):
        load_nifti(tmp_path / "missing.nii.gz")


def test_a_nifti_scan_gives_the_same_array_in_any_storage_order(tmp_path):
    """The same voxels stored left-to-right (RAS) and right-to-left (LAS, the x axis and its affine flipped) are one
    scan: left/right labels (OrganMNIST3D's kidneys) depend on reading them alike. Both come out as LPS (x and y
    reversed from RAS), then (D, H, W). A single slice is a 2D image."""
    nibabel = pytest.importorskip("nibabel")
    voxels = np.random.default_rng(0).random((6, 5, 4), dtype=np.float32)
    flip_x = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip_x[0, 3] = voxels.shape[0] - 1  # voxel i of the flipped file sits where voxel (5 - i) of the other does
    nibabel.save(nibabel.Nifti1Image(voxels, np.eye(4)), tmp_path / "ras.nii.gz")
    nibabel.save(nibabel.Nifti1Image(voxels[::-1].copy(), flip_x), tmp_path / "las.nii.gz")
    ras, las = load_nifti(tmp_path / "ras.nii.gz"), load_nifti(tmp_path / "las.nii.gz")
    np.testing.assert_array_equal(ras.array, las.array)
    np.testing.assert_array_equal(ras.array, voxels[::-1, ::-1].transpose())
    zooms = np.diag([0.5, 2.0, 3.0, 1.0])
    for axis, expected_spacing in ((2, (2.0, 0.5)), (1, (3.0, 0.5))):  # an axial and a coronal slice
        one_slice = voxels.take([0], axis=axis)
        nibabel.save(nibabel.Nifti1Image(one_slice, zooms), tmp_path / "slice.nii.gz")
        image = load_nifti(tmp_path / "slice.nii.gz")
        assert image.spatial_dims == 2 and image.array.shape == one_slice.squeeze(axis).transpose().shape
        assert image.spacing == expected_spacing
    # A coronal slice with a mark at its most superior voxel (highest z in RAS and LPS): the top row, head up.
    coronal = np.zeros((6, 1, 4), np.float32)
    coronal[:, 0, -1] = 1.0
    nibabel.save(nibabel.Nifti1Image(coronal, np.eye(4)), tmp_path / "coronal.nii.gz")
    image = load_nifti(tmp_path / "coronal.nii.gz")
    assert image.array.shape == (4, 6) and image.array[0].tolist() == [1.0] * 6 and image.array[1:].sum() == 0
    sagittal = np.zeros((1, 5, 4), np.float32)
    sagittal[0, :, -1] = 1.0
    nibabel.save(nibabel.Nifti1Image(sagittal, np.eye(4)), tmp_path / "sagittal.nii.gz")
    assert load_nifti(tmp_path / "sagittal.nii.gz").array[0].tolist() == [1.0] * 5


def test_a_dicom_series_and_a_nifti_file_of_one_scan_give_one_array(tmp_path):
    """A scanner's axial series (rows along +y, columns along +x of DICOM's LPS frame, slices up +z) and the same
    voxels as NIfTI (RAS affine: x and y negated) must read alike, or a model trained on one flips the other."""
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    scan = np.random.default_rng(0).integers(-1000, 1000, (6, 8, 10)).astype(np.int16)  # (slice, row, column)
    (tmp_path / "series").mkdir()
    for index in (3, 0, 5, 1, 4, 2):  # files in no particular order: the position sorts them
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset = Dataset()
        dataset.file_meta, dataset.SOPClassUID, dataset.SOPInstanceUID = meta, CTImageStorage, generate_uid()
        dataset.Modality, dataset.Rows, dataset.Columns = "CT", 8, 10
        dataset.PixelSpacing, dataset.ImageOrientationPatient = [1.0, 1.0], [1, 0, 0, 0, 1, 0]
        dataset.ImagePositionPatient = [0.0, 0.0, 2.0 * index]
        dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 1
        dataset.PixelData = scan[index].tobytes()
        dataset.save_as(tmp_path / "series" / f"{index}.dcm", enforce_file_format=True)
    # Voxel (i, j, k) = (column, row, slice) sits at LPS (i, j, 2k) = RAS (-i, -j, 2k).
    nibabel.save(nibabel.Nifti1Image(scan.transpose(2, 1, 0), np.diag([-1.0, -1.0, 2.0, 1.0])), tmp_path / "ct.nii.gz")
    dicom, nifti = load_dicom(tmp_path / "series"), load_nifti(tmp_path / "ct.nii.gz", modality="ct")
    np.testing.assert_array_equal(dicom.array, scan.astype(np.float32))
    np.testing.assert_array_equal(nifti.array, dicom.array)
    assert nifti.spacing == dicom.spacing == (2.0, 1.0, 1.0)
    assert nifti.orientation == dicom.orientation == "SPL"  # slices up, rows to the back, columns to the left


def test_turning_volumes_between_orientations_by_hand():
    """Hand-checked: "SPL" (how files are read) to "LPS" (OrganMNIST3D's arrays) swaps the first and last axes; "RAS"
    to "LPS" mirrors the first two; a sagittal series ("RIP": slices to the right, rows down, columns to the back)
    turns to "LPS" by swapping its last two axes and mirroring the first and last. Spacing follows its axes."""
    from medformer_hf.image_processing_medformer import MedicalImage, reorient, turned_to

    array = np.arange(24).reshape(2, 3, 4)
    assert reorient(array, "SPL", "LPS")[0].tolist() == array.transpose(2, 1, 0).tolist()
    assert reorient(array, "RAS", "LPS")[0].tolist() == array[::-1, ::-1, :].tolist()
    sagittal = reorient(array, "RIP", "LPS")[0]
    assert sagittal.shape == (2, 4, 3) and sagittal[0, 0, 0] == array[1, 2, 0] == 20
    assert sagittal.tolist() == array.transpose(0, 2, 1)[::-1, :, ::-1].tolist()
    assert reorient(reorient(array, "RIP", "LPS")[0], "LPS", "RIP")[0].tolist() == array.tolist()
    with pytest.raises(ValueError, match="one of each of L/R, A/P and S/I"):
        reorient(array, "LPP", "LPS")
    volume = MedicalImage(array=array.astype(np.float32), spatial_dims=3, spacing=(3.0, 2.0, 1.0), orientation="SPL")
    turned = turned_to([volume], "LPS")[0]
    assert turned.orientation == "LPS" and turned.spacing == (1.0, 2.0, 3.0) and turned.array.shape == (4, 3, 2)


def test_the_processor_turns_file_volumes_to_the_orientation_asked_and_leaves_arrays_alone():
    from transformers.testing_utils import CaptureLogger

    from medformer_hf import image_processing_medformer
    from medformer_hf.image_processing_medformer import MedicalImage

    processor = MedformerImageProcessor()
    array = np.random.default_rng(0).random((8, 12, 16), dtype=np.float32)
    file_volume = MedicalImage(array=array, spatial_dims=3, orientation="SPL")
    turned = processor(file_volume, orientation="LPS").pixel_values
    torch.testing.assert_close(turned, processor(array.transpose(2, 1, 0).copy(), spatial_dims=3).pixel_values)
    as_given = processor(array, spatial_dims=3).pixel_values
    torch.testing.assert_close(processor(array, spatial_dims=3, orientation="LPS").pixel_values, as_given)
    with CaptureLogger(image_processing_medformer.logger) as logged:
        unknown = processor(MedicalImage(array=array, spatial_dims=3), orientation="LPS").pixel_values
    torch.testing.assert_close(unknown, as_given)
    assert "records no orientation" in logged.out
    with pytest.raises(ValueError, match="orientation: 'XYZ' is not a volume orientation"):
        processor(file_volume, orientation="XYZ")


def test_a_sagittal_dicom_series_knows_which_way_it_points(tmp_path):
    """Rows along -z (head at the top), columns along +y, slices stacked toward the patient's right: "RIP"."""
    for index in range(3):
        dataset = _ct_dataset(rows=4, columns=5)
        dataset.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        dataset.ImagePositionPatient = [-2.0 * index, 0.0, 0.0]
        dataset.PixelSpacing = [1.0, 1.0]
        dataset.PixelData = np.full((4, 5), index, np.int16).tobytes()
        dataset.save_as(tmp_path / f"{index}.dcm", enforce_file_format=True)
    volume = load_dicom(tmp_path)
    assert volume.orientation == "RIP" and volume.array[:, 0, 0].tolist() == [0.0, 1.0, 2.0]
    # Oblique slices still name each pair once (taking each direction's largest component alone gave e.g. "PLL").
    from medformer_hf.image_processing_medformer import _volume_orientation

    s = 0.5**0.5
    assert _volume_orientation([s, s, 0, -s, s, 0])[0] == "S"  # an axial plane turned 45 degrees
    for orientation in ([0.6, 0.57, 0.57, 0.8, -0.42, -0.42], [s, s, 0, -s, s, 0]):
        assert orientation_problem(_volume_orientation(orientation)) is None


def _ct_dataset(rows: int = 4, columns: int = 4) -> pydicom.Dataset:
    """A minimal signed 16-bit CT dataset that pydicom can write and read back."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta, dataset.SOPClassUID, dataset.SOPInstanceUID = meta, CTImageStorage, generate_uid()
    dataset.Modality, dataset.Rows, dataset.Columns = "CT", rows, columns
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 1
    return dataset


def test_a_folder_of_two_series_or_of_repeated_positions_is_refused(tmp_path):
    """Two reconstructions of one scan (soft-tissue and lung kernels) at the same positions would interleave into a
    volume twice as deep with spacing 0: refused, naming both series; so are repeats of a position in one series."""
    from pydicom.uid import generate_uid

    series = {"soft tissue": generate_uid(), "lung": generate_uid()}
    for description, uid in series.items():
        for index in range(3):
            dataset = _ct_dataset()
            dataset.SeriesInstanceUID, dataset.SeriesDescription = uid, description
            dataset.ImagePositionPatient, dataset.ImageOrientationPatient = [0.0, 0.0, float(index)], [1, 0, 0, 0, 1, 0]
            dataset.PixelData = np.full((4, 4), 100 if description == "lung" else -900, np.int16).tobytes()
            dataset.save_as(tmp_path / f"{description}_{index}.dcm", enforce_file_format=True)
    with pytest.raises(ValueError, match="holds 2 DICOM series") as error:
        load_dicom(tmp_path)
    assert "(soft tissue): 3 files" in str(error.value) and "(lung): 3 files" in str(error.value)
    for file in tmp_path.glob("lung_*.dcm"):  # one series left: it loads
        file.unlink()
    assert load_dicom(tmp_path).array.shape == (3, 4, 4)
    repeat = pydicom.dcmread(tmp_path / "soft tissue_0.dcm")
    repeat.SOPInstanceUID = generate_uid()
    repeat.save_as(tmp_path / "soft tissue_0_echo2.dcm", enforce_file_format=True)
    with pytest.raises(ValueError, match=r"several share a slice position \(\[0.0\]\)"):
        load_dicom(tmp_path)


def test_an_enhanced_multi_frame_ct_comes_out_in_hounsfield_units_sorted_by_position(tmp_path):
    """Enhanced CT keeps its rescale and plane positions in functional groups, not at the top level: water stored as
    1024 must read 0 HU, and frames stored out of order come back inferior to superior with their spacing."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    def item(**attributes) -> Dataset:
        entry = Dataset()
        for name, value in attributes.items():
            setattr(entry, name, value)
        return entry

    depths = [5.0, 0.0, 10.0]  # frame k stored at these z positions
    stored = np.stack([np.full((4, 4), 1024 + int(z), np.int16) for z in depths])  # HU = z after the rescale
    dataset = _ct_dataset()
    dataset.NumberOfFrames = len(depths)
    dataset.PixelData = stored.tobytes()
    dataset.SharedFunctionalGroupsSequence = Sequence(
        [
            item(
                PixelValueTransformationSequence=Sequence([item(RescaleIntercept=-1024, RescaleSlope=1)]),
                PlaneOrientationSequence=Sequence([item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])]),
                PixelMeasuresSequence=Sequence([item(PixelSpacing=[0.5, 0.5], SliceThickness=5.0)]),
            )
        ]
    )
    dataset.PerFrameFunctionalGroupsSequence = Sequence(
        [item(PlanePositionSequence=Sequence([item(ImagePositionPatient=[0.0, 0.0, z])])) for z in depths]
    )
    dataset.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    volume = load_dicom(tmp_path / "enhanced.dcm")
    assert volume.spatial_dims == 3 and volume.array[:, 0, 0].tolist() == [0.0, 5.0, 10.0]
    assert volume.spacing == (5.0, 0.5, 0.5) and volume.orientation == "SPL"


@pytest.mark.skipif(not MRICRON_TEMPLATES.is_dir(), reason="Debian's mricron-data is not installed")
@pytest.mark.parametrize("name", ["ch2.nii.gz", "ch2better.nii.gz", "inia19-t1-brain.nii.gz"])
def test_mricron_brain_templates_load_and_run(name):
    path = MRICRON_TEMPLATES / name
    if not path.exists():
        pytest.skip(f"{path} is not in this mricron-data version")
    image = load_nifti(path, modality="mri", body_part="brain")
    assert image.array.ndim == 3 and min(image.array.shape) > 50
    _through_model(image, make_tiny_config(), normalization="image", size_3d=[32, 32, 32])


def test_missing_optional_dependency_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'medformer-hf\[medical\]'"):
        load_dicom(get_testdata_file("CT_small.dcm"))


def test_a_file_that_is_not_dicom_is_named(tmp_path):
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "slice.dcm")
    (tmp_path / "notes.txt").write_text("scanner settings")
    with pytest.raises(ValueError, match=r"notes.txt is not a DICOM file.*move other files out"):
        load_dicom(tmp_path)
    with pytest.raises(ValueError, match=r"notes.txt is not a DICOM file.*the medical pipeline also takes their paths"):
        load_dicom(tmp_path / "notes.txt")


def test_monochrome1_is_inverted_within_the_stored_range_not_each_image_own(tmp_path):
    """An X-ray stored as MONOCHROME1 (low values white) reads as MONOCHROME2 would: mirrored within its 12 bits, so
    one stored value gives one intensity whatever else the image holds (one bright marker pixel changes nothing)."""
    from pydicom.uid import DigitalXRayImageStorageForPresentation

    anatomy = np.array([[3000, 3000], [500, 500]], np.uint16)  # air, then bone (white: low values)
    with_marker = anatomy.copy()
    with_marker[0, 0] = 4095
    loaded = []
    for name, pixels in (("plain", anatomy), ("marker", with_marker)):
        dataset = _ct_dataset(rows=2, columns=2)
        dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
        dataset.Modality, dataset.PhotometricInterpretation = "DX", "MONOCHROME1"
        dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 12, 11, 0
        dataset.PixelData = pixels.tobytes()
        dataset.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
        loaded.append(load_dicom(tmp_path / f"{name}.dcm").array)
    np.testing.assert_array_equal(loaded[0], [[1095, 1095], [3595, 3595]])  # 4095 - stored: bone bright
    np.testing.assert_array_equal(loaded[1][1], loaded[0][1])
    assert loaded[1][0].tolist() == [0, 1095]
    # With a rescale the mirror is of the stored values, before it: slope 2, intercept -100.
    dataset = pydicom.dcmread(tmp_path / "plain.dcm")
    dataset.RescaleSlope, dataset.RescaleIntercept = 2, -100
    dataset.save_as(tmp_path / "rescaled.dcm", enforce_file_format=True)
    np.testing.assert_array_equal(load_dicom(tmp_path / "rescaled.dcm").array, 2 * loaded[0] - 100)
