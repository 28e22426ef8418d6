"""read_image / read_image_bytes: every format, every refusal path."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from medsight.data.io import WINDOWS, read_image, read_image_bytes, resolve_window, sniff_format
from medsight.errors import DataError



# ----------------------------------------------------------------------------- pydicom's own test files


def _pydicom_test_files() -> list[str]:
    """Every local file pydicom ships as test data (incl. files without a .dcm suffix, e.g. dicomdirtests).

    pydicom's ``get_testdata_files`` also tries to *download* optional files; this environment has no
    network, so the download map is blanked for the call and only the shipped files are listed.
    """
    import pydicom.data.data_manager as dm
    from pydicom.data import get_testdata_files

    orig = dm.online_test_file_dummy_paths
    dm.online_test_file_dummy_paths = lambda: {}
    try:
        files = get_testdata_files("*") + get_testdata_files("**/*")
    finally:
        dm.online_test_file_dummy_paths = orig
    return sorted({f for f in files if os.path.isfile(f)})


PYDICOM_FILES = _pydicom_test_files()


def test_pydicom_list_includes_files_without_dcm_suffix():
    names = [Path(f).name for f in PYDICOM_FILES]
    assert len(PYDICOM_FILES) > 80
    assert "DICOMDIR" in names and any("." not in n for n in names if n != "DICOMDIR")


def _is_dicom(path: str) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(600)
    return sniff_format(head, Path(path).name) == "dicom"


DICOM_FILES = [f for f in PYDICOM_FILES if _is_dicom(f)]


def test_every_pydicom_test_file_is_sniffed():
    assert len(DICOM_FILES) >= 140  # 78 top-level .dcm files + dicomdirtests without suffixes


@pytest.mark.parametrize("path", DICOM_FILES, ids=lambda p: Path(p).name)
def test_pydicom_test_file_reads_or_refuses_cleanly(path):
    try:
        arr, meta = read_image(path)
    except DataError as e:
        msg = str(e)
        assert Path(path).name in msg and "\n" not in msg
        return
    assert arr.dtype == np.float32 and arr.size > 0
    assert np.isfinite(arr).all()
    assert arr.ndim in (3, 4)
    assert meta["shape"] == arr.shape
    assert len(meta["spacing"]) == arr.ndim - 1
    assert arr.shape[0] in (1, 3)


def test_non_dicom_pydicom_files_refused_cleanly():
    others = [f for f in PYDICOM_FILES if f not in DICOM_FILES]
    assert others
    for f in others:
        with pytest.raises(DataError, match=Path(f).name):
            read_image(f)


def test_known_refusals_have_clear_reasons():
    from pydicom.data import get_testdata_file

    with pytest.raises(DataError, match=r"MR_truncated\.dcm: DICOM pixel data truncated \(expected 8192 bytes, got 8130\)"):
        read_image(get_testdata_file("MR_truncated.dcm"))
    with pytest.raises(DataError, match=r"rtplan\.dcm: DICOM file has no pixel data"):
        read_image(get_testdata_file("rtplan.dcm"))


@pytest.mark.parametrize(
    "name, shape",
    [
        ("JPEG2000.dcm", (1, 1024, 256)),
        ("MR_small_jpeg_ls_lossless.dcm", (1, 64, 64)),
        ("MR_small_RLE.dcm", (1, 64, 64)),
        ("SC_rgb_jpeg_dcmtk.dcm", (3, 100, 100)),
        ("SC_ybr_full_422_uncompressed.dcm", (3, 100, 100)),
        ("examples_palette.dcm", (3, 350, 800)),
        ("rtdose.dcm", (1, 15, 10, 10)),
        ("examples_ybr_color.dcm", (3, 30, 240, 320)),
    ],
)
def test_compressed_colour_and_multiframe(name, shape):
    from pydicom.data import get_testdata_file

    arr, meta = read_image(get_testdata_file(name))
    assert arr.shape == shape
    if shape[0] == 3:
        assert meta["photometric"] == "RGB"


def test_jpeg_lossless_matches_uncompressed():
    from pydicom.data import get_testdata_file

    a, _ = read_image(get_testdata_file("MR_small.dcm"))
    b, _ = read_image(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    np.testing.assert_array_equal(a, b)


def test_ct_rescale_gives_hounsfield():
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    arr, meta = read_image(path)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(arr[0], expected)
    assert meta["value_range"] is None and meta["modality"] == "CT"
    assert "private" in meta and meta["private"].get("PatientID") == str(ds.PatientID)


# ----------------------------------------------------------------------------- real samples


@pytest.mark.realdata
def test_sample_ct_series_folder(samples_dir):
    import pydicom

    folder = samples_dir / "ct_dicom_series"
    arr, meta = read_image(folder)
    assert arr.shape == (1, 4, 16, 16) and arr.dtype == np.float32
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.iterdir())]
    heads.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    z = [float(d.ImagePositionPatient[2]) for d in heads]
    assert meta["spacing"][1:] == pytest.approx([float(v) for v in heads[0].PixelSpacing])
    assert meta["spacing"][0] == pytest.approx(float(np.median(np.diff(z))), abs=1e-4)
    assert meta["format"] == "dicom-series" and meta["n_slices"] == 4
    # slices are sorted along the normal: slice k equals the k-th file by z, in HU
    for k, d in enumerate(heads):
        hu = d.pixel_array if "PixelData" in d else pydicom.dcmread(d.filename).pixel_array
        hu = hu * float(d.RescaleSlope) + float(d.RescaleIntercept)
        np.testing.assert_allclose(arr[0, k], hu)


@pytest.mark.realdata
def test_sample_ct_slice_hu(samples_dir):
    import pydicom

    path = samples_dir / "torchio_IMG0001.dcm"
    arr, meta = read_image(path)
    assert arr.shape == (1, 128, 88)
    ds = pydicom.dcmread(path)
    np.testing.assert_allclose(arr[0], ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    assert meta["spacing"] == pytest.approx((2.0, 2.0)) and meta["modality"] == "CT"
    lung, m2 = read_image(path, window="lung")
    assert lung.min() >= 0 and lung.max() <= 1 and m2["window"] == WINDOWS["lung"]


@pytest.mark.realdata
def test_sample_nifti(samples_dir):
    arr, meta = read_image(samples_dir / "nifti" / "anatomical.nii")
    assert arr.shape == (1, 33, 41, 25) and meta["spacing"] == pytest.approx((2.0, 2.0, 2.0))
    assert meta["orientation"] == "RAS" and arr.dtype == np.float32
    arr2, meta2 = read_image(samples_dir / "nifti" / "someones_anatomy.nii.gz")
    assert arr2.shape == (1, 57, 67, 56) and meta2["spacing"] == pytest.approx((2.75, 2.75, 2.75))
    assert meta2["orientation"] == "RAS"


@pytest.mark.realdata
def test_sample_bytes_match_path(samples_dir):
    for rel in ("torchio_IMG0001.dcm", "nifti/anatomical.nii", "nifti/someones_anatomy.nii.gz"):
        p = samples_dir / rel
        a, _ = read_image(p)
        b, _ = read_image_bytes(p.read_bytes(), "upload.bin")  # format sniffed, not from the name
        np.testing.assert_array_equal(a, b)


@pytest.mark.realdata
def test_sample_nifti_truncated_refused(samples_dir, tmp_path):
    data = (samples_dir / "nifti" / "anatomical.nii").read_bytes()
    bad = tmp_path / "cut.nii"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.nii"):
        read_image(bad)
    gz = tmp_path / "cut.nii.gz"
    gz.write_bytes(gzip.compress(data)[:2000])
    with pytest.raises(DataError, match="cut.nii.gz"):
        read_image(gz)
    with pytest.raises(DataError, match="up.nii.gz"):
        read_image_bytes(gzip.compress(data)[:2000], "up.nii.gz")


# ----------------------------------------------------------------------------- synthetic DICOM


def test_monochrome1_inverted(dicom_factory):
    px = np.array([[0, 100], [200, 4095]], dtype=np.uint16)
    m2, _ = read_image(dicom_factory("m2.dcm", px, modality="CR"))
    m1, meta = read_image(dicom_factory("m1.dcm", px, photometric="MONOCHROME1", modality="CR"))
    assert meta["photometric"] == "MONOCHROME2"
    lo, hi = meta["value_range"]
    np.testing.assert_allclose(m1, (lo + hi) - m2)
    # windowed MONOCHROME1 is inverted inside [0, 1]
    w1, _ = read_image(dicom_factory("m1w.dcm", px, photometric="MONOCHROME1", modality="CR"), window=(2048, 4096))
    w2, _ = read_image(dicom_factory("m2w.dcm", px, modality="CR"), window=(2048, 4096))
    np.testing.assert_allclose(w1, 1 - w2, atol=1e-6)


def test_rescale_and_windows(dicom_factory):
    px = np.array([[0, 1000], [1024, 3000]], dtype=np.uint16)
    path = dicom_factory("ct.dcm", px, slope=1, intercept=-1024, window=(40, 400))
    hu, meta = read_image(path)
    np.testing.assert_allclose(hu[0], px.astype(np.float32) - 1024)
    assert meta["value_range"] is None
    soft, m = read_image(path, window="soft_tissue")
    np.testing.assert_allclose(soft[0], np.clip((px - 1024.0 - (40 - 200)) / 400, 0, 1), atol=1e-6)
    assert m["window"] == (40.0, 400.0) and m["value_range"] == (0.0, 1.0)
    filewin, m = read_image(path, window="dicom")
    np.testing.assert_allclose(filewin, soft, atol=1e-6)
    tup, _ = read_image(path, window=(-600, 1500))
    lung, _ = read_image(path, window="lung")
    np.testing.assert_array_equal(tup, lung)


def test_window_argument_validation(dicom_factory):
    with pytest.raises(DataError, match="unknown window 'liverish'"):
        resolve_window("liverish")
    with pytest.raises(DataError, match="width must be > 0"):
        resolve_window((40, 0))
    with pytest.raises(DataError, match="invalid window"):
        resolve_window(("a", "b"))
    path = dicom_factory("nowin.dcm")
    with pytest.raises(DataError, match="nowin.dcm: window='dicom' requested"):
        read_image(path, window="dicom")


def test_dicom_rgb(dicom_factory):
    px = np.zeros((4, 5, 3), np.uint8)
    px[..., 0] = 255
    arr, meta = read_image(dicom_factory("rgb.dcm", px, photometric="RGB", modality="OT"))
    assert arr.shape == (3, 4, 5) and meta["photometric"] == "RGB"
    assert (arr[0] == 255).all() and (arr[1:] == 0).all()


def test_dicom_truncated_and_bomb(dicom_factory, tmp_path):
    import pydicom

    path = dicom_factory("cut.dcm")
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:50]
    ds.save_as(path)
    with pytest.raises(DataError, match=r"cut\.dcm: DICOM pixel data truncated \(expected 128 bytes, got 50\)"):
        read_image(path)
    with pytest.raises(DataError, match="decompression bomb"):
        read_image(dicom_factory("big.dcm"), max_elements=10)


def test_garbage_and_missing_files(tmp_path):
    bad = tmp_path / "noise.dcm"
    bad.write_bytes(os.urandom(2000))
    with pytest.raises(DataError, match="noise.dcm"):
        read_image(bad)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.png"):
        read_image(empty)
    with pytest.raises(DataError, match="missing.png: file not found"):
        read_image(tmp_path / "missing.png")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(DataError, match="notes.txt: unrecognised file format"):
        read_image(txt)
    with pytest.raises(DataError, match="x.bin: empty upload"):
        read_image_bytes(b"", "x.bin")
    with pytest.raises(DataError, match="x.bin: unrecognised"):
        read_image_bytes(b"hello world", "x.bin")
    with pytest.raises(DataError, match="z.gz: gzip file that does not hold a NIfTI"):
        read_image_bytes(gzip.compress(b"hello" * 100), "z.gz")


def test_series_folder_sorting_and_refusals(tmp_path, make_dicom_file):
    make_dicom = make_dicom_file
    folder = tmp_path / "series"
    folder.mkdir()
    zs = [10.0, 0.0, 5.0]
    for i, z in enumerate(zs):
        px = np.full((4, 4), int(z) + 1024, np.uint16)
        make_dicom(folder / f"s{i}.dcm", px, slope=1, intercept=-1024, position=(0, 0, z), instance=10 - i)
    (folder / "readme.txt").write_text("not dicom")
    arr, meta = read_image(folder)
    assert arr.shape == (1, 3, 4, 4)
    assert [float(arr[0, k, 0, 0]) for k in range(3)] == [0.0, 5.0, 10.0]
    assert meta["spacing"] == pytest.approx((5.0, 0.5, 0.7))
    assert meta["irregular_slice_spacing"] is False
    make_dicom(folder / "other.dcm", np.zeros((4, 4), np.uint16), series_uid="1.2.3.999", position=(0, 0, 1))
    with pytest.raises(DataError, match=r"series.*2 DICOM series"):
        read_image(folder)
    arr2, _ = read_image(folder, series_uid="1.2.3.999")
    assert arr2.shape == (1, 1, 4, 4)
    with pytest.raises(DataError, match="series '9.9' not found"):
        read_image(folder, series_uid="9.9")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(DataError, match="empty_dir: folder holds no DICOM"):
        read_image(empty)


def test_series_without_positions_uses_instance_number(tmp_path, make_dicom_file):
    make_dicom = make_dicom_file
    folder = tmp_path / "s"
    folder.mkdir()
    for i, inst in enumerate([3, 1, 2]):
        make_dicom(folder / f"f{i}.dcm", np.full((2, 2), inst, np.uint16), instance=inst, modality="OT")
    arr, meta = read_image(folder)
    assert [float(arr[0, k, 0, 0]) for k in range(3)] == [1.0, 2.0, 3.0]
    assert meta["slice_order"] == "instance"


def test_series_size_mismatch(tmp_path, make_dicom_file):
    make_dicom = make_dicom_file
    folder = tmp_path / "mix"
    folder.mkdir()
    make_dicom(folder / "a.dcm", np.zeros((4, 4), np.uint16), position=(0, 0, 0))
    make_dicom(folder / "b.dcm", np.zeros((5, 4), np.uint16), position=(0, 0, 1))
    with pytest.raises(DataError, match="mix: slices differ in size"):
        read_image(folder)


# ----------------------------------------------------------------------------- Pillow formats


def test_png_8bit_and_16bit_full_depth(tmp_path, save_png_file):
    save_png = save_png_file
    a8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    arr, meta = read_image(save_png(tmp_path / "g8.png", a8))
    assert arr.shape == (1, 16, 16) and meta["value_range"] == (0.0, 255.0) and meta["bits"] == 8
    np.testing.assert_array_equal(arr[0], a8)
    a16 = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257).astype(np.uint16)
    arr, meta = read_image(save_png(tmp_path / "g16.png", a16))
    assert meta["value_range"] == (0.0, 65535.0) and meta["bits"] == 16
    np.testing.assert_array_equal(arr[0], a16)  # not truncated to 8 bits
    assert arr.max() == 65535


def test_png_rgb_rgba_palette(tmp_path, save_png_file):
    save_png = save_png_file
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 255, (6, 7, 3), dtype=np.uint8)
    arr, meta = read_image(save_png(tmp_path / "rgb.png", rgb))
    assert arr.shape == (3, 6, 7) and meta["photometric"] == "RGB"
    np.testing.assert_array_equal(np.moveaxis(arr, 0, -1), rgb)
    rgba = np.concatenate([rgb, np.full((6, 7, 1), 128, np.uint8)], axis=-1)
    arr, _ = read_image(save_png(tmp_path / "rgba.png", rgba))
    assert arr.shape == (3, 6, 7)
    gray_pal = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert("P")
    gray_pal.save(tmp_path / "pal_gray.png")
    arr, meta = read_image(tmp_path / "pal_gray.png")
    assert arr.shape[0] == 1
    col_pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE)
    col_pal.save(tmp_path / "pal_rgb.png")
    arr, meta = read_image(tmp_path / "pal_rgb.png")
    assert arr.shape == (3, 6, 7)


def test_jpeg_tiff_bmp_and_bytes(tmp_path):
    from PIL import Image

    a = np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))
    for ext in ("jpg", "tif", "bmp"):
        Image.fromarray(a).save(tmp_path / f"x.{ext}")
        arr, meta = read_image(tmp_path / f"x.{ext}")
        assert arr.shape == (1, 32, 32)
        b, _ = read_image_bytes((tmp_path / f"x.{ext}").read_bytes(), "no_extension")
        np.testing.assert_array_equal(arr, b)
    # a multi-page TIFF becomes a volume
    pages = [Image.fromarray(a + i) for i in range(3)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    arr, _ = read_image(tmp_path / "stack.tif")
    assert arr.shape == (1, 3, 32, 32)


def test_png_truncated_and_bomb(tmp_path, save_png_file):
    save_png = save_png_file
    a = np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8)
    p = save_png(tmp_path / "full.png", a)
    cut = tmp_path / "cut.png"
    cut.write_bytes(p.read_bytes()[:200])
    with pytest.raises(DataError, match="cut.png"):
        read_image(cut)
    with pytest.raises(DataError, match="full.png: .*limit of 100"):
        read_image(p, max_elements=100)
    with pytest.raises(DataError, match="up.png"):
        read_image_bytes(cut.read_bytes(), "up.png")


def test_png_window_applies_to_gray(tmp_path, save_png_file):
    save_png = save_png_file
    a = np.array([[0, 100], [200, 255]], np.uint8)
    arr, meta = read_image(save_png(tmp_path / "w.png", a), window=(128, 256))
    assert arr.min() >= 0 and arr.max() <= 1 and meta["window"] == (128.0, 256.0)


def test_sniff_format():
    assert sniff_format(b"\x00" * 128 + b"DICM") == "dicom"
    assert sniff_format(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10) == "png"
    assert sniff_format(b"\xff\xd8\xff\xe0") == "jpeg"
    assert sniff_format(b"\x1f\x8b\x08") == "gzip"
    assert sniff_format(b"hello", "a.txt") is None


# ----------------------------------------------------------------------------- synthetic NIfTI


def _nifti(path, data, zooms=(1.0, 2.0, 3.0), affine=None):
    import nibabel as nib

    aff = np.diag([*zooms[:3], 1.0]) if affine is None else affine
    img = nib.Nifti1Image(data, aff)
    img.header.set_zooms(tuple(zooms) + (1.0,) * (data.ndim - len(zooms)))
    nib.save(img, str(path))
    return path


def test_nifti_4d_channels_flip_and_bytes(tmp_path):
    data = np.random.default_rng(0).random((5, 6, 7, 2)).astype(np.float32)
    arr, meta = read_image(_nifti(tmp_path / "v.nii.gz", data))
    assert arr.shape == (2, 5, 6, 7) and meta["spacing"] == pytest.approx((1.0, 2.0, 3.0))
    np.testing.assert_allclose(arr[1], data[..., 1])
    # an LAS image is flipped to RAS
    aff = np.diag([-1.0, 2.0, 3.0, 1.0])
    vol = np.random.default_rng(1).random((4, 5, 6)).astype(np.float32)
    arr, meta = read_image(_nifti(tmp_path / "las.nii", vol, affine=aff))
    assert meta["orientation"] == "RAS"
    np.testing.assert_allclose(arr[0], vol[::-1])
    b, _ = read_image_bytes((tmp_path / "v.nii.gz").read_bytes(), "v")
    assert b.shape == (2, 5, 6, 7)


def test_nifti_nan_and_bomb_refused(tmp_path):
    data = np.ones((4, 4, 4), np.float32)
    data[1, 1, 1] = np.nan
    with pytest.raises(DataError, match="nan.nii: pixel values contain NaN"):
        read_image(_nifti(tmp_path / "nan.nii", data))
    ok = _nifti(tmp_path / "ok.nii", np.ones((4, 4, 4), np.float32))
    with pytest.raises(DataError, match="ok.nii: image has 64 elements, above the limit of 10"):
        read_image(ok, max_elements=10)
    with pytest.raises(DataError, match="ok.nii: window='dicom' only applies to DICOM"):
        read_image(ok, window="dicom")


# ----------------------------------------------------------------------------- format ownership and codestream parsers


def test_sniff_nifti_gz_and_readable_files(tmp_path):
    from medsight.data.io import file_format, is_readable_file, is_readable_name, walk_readable

    nii = _nifti(tmp_path / "v.nii.gz", np.ones((4, 4, 4), np.float32))
    assert sniff_format(nii.read_bytes()[:600]) == "nifti-gz"  # from the inflated header, no name needed
    assert sniff_format(b"\x1f\x8b\x08", "scan.nii.gz") == "nifti-gz"
    assert is_readable_name("A.DCM") and is_readable_name("v.nii.gz") and not is_readable_name(".x.png")
    assert not is_readable_name("DICOMDIR") and not is_readable_name("notes.txt")
    dcm = tmp_path / "sub" / "IM0001"  # suffix-less DICOM: found by content
    dcm.parent.mkdir()
    dcm.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    (tmp_path / "sub" / "README").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "a.png").write_bytes(b"x")
    assert file_format(dcm) == "dicom" and is_readable_file(dcm)
    assert not is_readable_file(tmp_path / "sub" / "README")
    assert [p.name for p in walk_readable(tmp_path)] == ["IM0001", "v.nii.gz"]


def test_codestream_header_parsers():
    import struct

    import pydicom
    from pydicom.encaps import generate_frames

    from medsight.data.io import j2k_frame_size, jpeg_frame_size, rle_check

    def first_frame(name):
        ds = pydicom.dcmread(str(Path(pydicom.__file__).parent / "data" / "test_files" / name))
        return next(generate_frames(ds.PixelData, number_of_frames=1))

    assert jpeg_frame_size(first_frame("SC_rgb_jpeg_dcmtk.dcm")) == (100, 100, 3)
    assert jpeg_frame_size(first_frame("MR_small_jpeg_ls_lossless.dcm")) == (64, 64, 1)  # SOF55
    assert j2k_frame_size(first_frame("MR_small_jp2klossless.dcm")) == (64, 64, 1)
    rle = first_frame("SC_rgb_rle.dcm")
    rle_check(rle, 3)
    with pytest.raises(ValueError, match="lists 3 segments; .* needs 6"):
        rle_check(rle, 6)
    with pytest.raises(ValueError, match="not increasing"):
        rle_check(struct.pack("<16I", 2, 64, 64, *[0] * 13) + b"\0" * 8, 2)
    with pytest.raises(ValueError, match="SOI"):
        jpeg_frame_size(b"\x00\x01")
    with pytest.raises(ValueError, match="no JPEG frame header"):
        jpeg_frame_size(b"\xff\xd8\xff\xe0\x00\x04ab\xff\xd9")
    with pytest.raises(ValueError, match="not a JPEG 2000 codestream"):
        j2k_frame_size(b"\x00" * 64)
