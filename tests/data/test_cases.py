import pytest

from brats_lab import DataError
from brats_lab.data.cases import LAYOUTS, MODALITIES, detect_layout, discover
from brats_lab.labels import BRATS_2020, BRATS_2023

CASE_IDS = {
    "brats2020": ["BraTS20_Training_001", "BraTS20_Training_002"],
    "brats2021": ["BraTS2021_00000", "BraTS2021_00002"],
    "brats2023": ["BraTS-GLI-00000-000", "BraTS-GLI-00002-001"],
}


@pytest.mark.parametrize("layout", [l.name for l in LAYOUTS])
def test_every_layout_is_detected_and_its_cases_found(tmp_path, case_writer, layout):
    for case_id in CASE_IDS[layout]:
        case_writer(tmp_path, case_id, layout=layout)
    (tmp_path / "not_a_case").mkdir()
    cases = discover(tmp_path)
    assert [c.id for c in cases] == CASE_IDS[layout]
    case = cases[0]
    assert case.layout.name == layout
    assert len(case.images) == len(MODALITIES) and all(p.is_file() for p in case.images)
    assert case.seg is not None and case.seg.is_file()
    assert case.geometry.size == (32, 32, 24)
    assert case.convention is (BRATS_2023 if layout == "brats2023" else BRATS_2020)
    if layout == "brats2023":  # modality order T1, T1ce, T2, FLAIR whatever the names
        assert [p.name.rsplit("-", 1)[1] for p in case.images] == ["t1n.nii.gz", "t1c.nii.gz", "t2w.nii.gz", "t2f.nii.gz"]


def test_dataset_inside_one_wrapper_folder_is_found(tmp_path, case_writer):
    case_writer(tmp_path / "MICCAI_BraTS2020_TrainingData", "BraTS20_Training_001")
    assert [c.id for c in discover(tmp_path)] == ["BraTS20_Training_001"]


def test_oddly_named_segmentation_is_found_and_noted(tmp_path, case_writer):
    folder = case_writer(tmp_path, "BraTS20_Training_355")
    (folder / "BraTS20_Training_355_seg.nii.gz").rename(folder / "W39_1998.09.19_Segm.nii.gz")
    (case,) = discover(tmp_path)
    assert case.seg.name == "W39_1998.09.19_Segm.nii.gz"
    assert "W39_1998.09.19_Segm.nii.gz" in case.notes[0] and "BraTS20_Training_355_seg" in case.notes[0]


def test_uncompressed_files_and_validation_sets_without_seg(tmp_path, case_writer):
    folder = case_writer(tmp_path, "BraTS20_Validation_001", with_seg=False)
    for p in folder.iterdir():
        p.rename(p.with_name(p.name.replace(".nii.gz", ".nii")))
    (case,) = discover(tmp_path)
    assert case.seg is None
    assert all(p.suffix == ".nii" and p.is_file() for p in case.images)


def test_missing_modality_keeps_its_expected_path(tmp_path, case_writer):
    folder = case_writer(tmp_path)
    (folder / "BraTS20_Training_001_t2.nii.gz").unlink()
    (case,) = discover(tmp_path)
    assert case.images[2].name == "BraTS20_Training_001_t2.nii.gz" and not case.images[2].exists()


def test_folder_without_cases_is_a_clear_error(tmp_path):
    (tmp_path / "random").mkdir()
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="no BraTS case folders found"):
        discover(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        detect_layout(tmp_path / "absent")
