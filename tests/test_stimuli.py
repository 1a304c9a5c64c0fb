from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vecsim.errors import ImageDecodeError, StimulusSetError
from vecsim.stimuli import decode_bytes, decode_image, discover


def test_folder_is_searched_recursively_in_sorted_order_with_stable_ids(image_set):
    a = discover(image_set)
    b = discover(image_set)
    paths = [s.path for s in a.stimuli]
    assert paths == sorted(paths)
    assert len(paths) == 18
    assert [(s.id, s.path) for s in a.stimuli] == [(s.id, s.path) for s in b.stimuli]
    assert all(s.label is None for s in a.stimuli)


def test_images_are_recognised_by_content_not_extension(image_set):
    Image.new("RGB", (10, 10), "red").save(image_set / "no_extension", format="PNG")
    (image_set / "notes.txt").write_text("not an image")
    (image_set / "fake.jpg").write_text("not a jpeg either")
    found = discover(image_set)
    paths = {s.path for s in found.stimuli}
    assert "no_extension" in paths
    assert "notes.txt" not in paths
    assert [f.path for f in found.failures] == ["fake.jpg"]
    assert "not an image" in found.failures[0].reason
    assert found.ignored_files == 1


def test_labels_from_folders(image_set):
    found = discover(image_set, labels_from_folders=True)
    assert {s.label for s in found.stimuli} == {"cat", "dog", "owl"}
    assert all(s.path.startswith(s.label + "/") for s in found.stimuli)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_manifest_gives_labels_and_extra_columns(image_set, tmp_path, fmt):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    found = discover(image_set)
    paths = [s.path for s in found.stimuli][:5]
    table = pa.table({"path": paths, "label": ["x", "y", "x", "y", "x"], "session": [1, 2, 3, 4, 5],
                      "note": ["a", "b", "c", "d", "e"]})
    manifest = tmp_path / f"m.{fmt}"
    (pacsv.write_csv if fmt == "csv" else pq.write_table)(table, manifest)
    sub = discover(image_set, manifest=manifest)
    assert [s.path for s in sub.stimuli] == sorted(paths)
    assert sub.extra_columns == ["session", "note"]
    first = sub.stimuli[0]
    row = table.to_pylist()[paths.index(first.path)]
    assert first.label == row["label"] and first.extra == {"session": row["session"], "note": row["note"]}


def test_manifest_errors(image_set, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.png,x\n")
    with pytest.raises(StimulusSetError, match="no 'path' column"):
        discover(image_set, manifest=bad)
    with pytest.raises(StimulusSetError, match="does not exist"):
        discover(image_set, manifest=tmp_path / "missing.csv")


def test_manifest_paths_are_normalised_but_never_moved(image_set, tmp_path):
    """'./a' and 'a/./b' name the same files; '../x' or '/x' (outside the folder) are errors,
    not quietly rewritten to a file inside it."""
    import shutil

    shutil.copy(image_set / "cat" / "img_00.png", image_set / ".hidden.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n./cat/img_00.png,a\ndog/./img_00.png,b\n.hidden.png,c\n")
    found = discover(image_set, manifest=manifest)
    assert [(s.path, s.label) for s in found.stimuli] == [(".hidden.png", "c"), ("cat/img_00.png", "a"),
                                                          ("dog/img_00.png", "b")]
    for outside in ("../img_00.png", str((image_set / "cat" / "img_00.png").resolve())):
        manifest.write_text(f"path,label\n{outside},x\n")
        with pytest.raises(StimulusSetError, match="is not inside the stimulus folder"):
            discover(image_set, manifest=manifest)


def test_an_empty_csv_cell_is_missing_as_in_parquet(image_set, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,note\ncat/img_00.png,c,\ndog/img_00.png,d,seen\n")
    found = discover(image_set, manifest=manifest)
    assert [s.extra["note"] for s in found.stimuli] == [None, "seen"]


def test_manifest_row_for_a_missing_file_is_a_failure(image_set, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\ncat/img_00.png,c\ngone.png,g\n")
    found = discover(image_set, manifest=manifest)
    assert [s.path for s in found.stimuli] == ["cat/img_00.png"]
    assert found.failures[0].path == "gone.png" and "does not exist" in found.failures[0].reason


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(StimulusSetError, match="does not exist"):
        discover(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StimulusSetError, match="no images found"):
        discover(tmp_path / "empty")
    with pytest.raises(StimulusSetError, match="unknown built-in"):
        discover("builtin:cifar")


def test_builtin_digits_is_served_as_labelled_images():
    found = discover("builtin:digits")
    assert len(found) == 1797
    assert {s.label for s in found.stimuli} == {str(d) for d in range(10)}


def _png_bytes(img: Image.Image, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    data = _png_bytes(Image.fromarray(arr))
    rgb = np.asarray(decode_bytes(data).image)
    assert rgb.shape == (1, 3, 3)
    assert list(rgb[0, :, 0]) == [0, 128, 255]


def test_alpha_is_composited_and_exif_rotation_applied():
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 0))
    out = np.asarray(decode_bytes(_png_bytes(rgba)).image)
    assert (out == 255).all()  # fully transparent -> white background
    img = Image.new("RGB", (6, 2), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    decoded = decode_bytes(_png_bytes(img, format="JPEG", exif=exif.tobytes()))
    assert decoded.image.size == (2, 6)
    assert (decoded.width, decoded.height) == (2, 6)  # the size the model sees


@pytest.mark.parametrize("mode, colour", [("L", 0), ("RGB", (0, 0, 0))])
def test_a_png_transparent_colour_is_composited_on_white(mode, colour):
    img = Image.new(mode, (3, 1), colour)
    img.putpixel((1, 0), 7 if mode == "L" else (7, 7, 7))
    out = np.asarray(decode_bytes(_png_bytes(img, transparency=colour)).image)
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [7, 7, 7]


def test_float_images_in_the_unit_range_are_taken_as_they_are():
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert np.asarray(decode_bytes(_png_bytes(floats, format="TIFF")).image)[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-1.0, 2.0, 4.0]], dtype=np.float32), mode="F")
    assert np.asarray(decode_bytes(_png_bytes(wide, format="TIFF")).image)[0, :, 0].tolist() == [0, 128, 255]


def test_pixel_limit_and_garbage_are_decode_errors(tmp_path):
    big = _png_bytes(Image.new("L", (100, 100)))
    with pytest.raises(ImageDecodeError, match="above the limit"):
        decode_bytes(big, max_pixels=5000)
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_bytes(b"hello")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty file"):
        decode_image(empty)
    truncated = tmp_path / "t.jpg"
    full = _png_bytes(Image.effect_noise((64, 64), 50).convert("RGB"), format="JPEG")
    truncated.write_bytes(full[: len(full) // 2])
    with pytest.raises(ImageDecodeError):
        decode_image(truncated)


def test_a_linked_class_folder_is_searched_and_a_loop_is_recorded_once(tmp_path):
    import os

    root, elsewhere = tmp_path / "src", tmp_path / "elsewhere" / "cats"
    (root / "dogs").mkdir(parents=True)
    elsewhere.mkdir(parents=True)
    for folder, n in ((root / "dogs", 2), (elsewhere, 3)):
        for i in range(n):
            Image.new("RGB", (12, 12), (40 * i, 80, 120)).save(folder / f"img_{i}.png")
    os.symlink(elsewhere, root / "cats")  # a class folder linked in from elsewhere
    os.symlink("..", root / "dogs" / "up")  # a loop back to the top
    found = discover(str(root), labels_from_folders=True)
    assert [s.path for s in found.stimuli] == ["cats/img_0.png", "cats/img_1.png", "cats/img_2.png",
                                               "dogs/img_0.png", "dogs/img_1.png"]
    assert [s.label for s in found.stimuli] == ["cats"] * 3 + ["dogs"] * 2
    loops = [f for f in found.failures if f.path == "dogs/up"]
    assert len(loops) == 1 and "already searched as '.'" in loops[0].reason
