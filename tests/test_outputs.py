"""The shared input/output helpers: prompt files, atomic files, atomic folder swaps."""
import pytest

from attnprobe.core.outputs import atomic_write_text, read_prompts, replace_dir, staged_output_dir


class MyError(ValueError):
    pass


def test_read_prompts_keeps_text_lines_and_skips_comments(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("# header\n a photo of coffee \n\n   # indented comment\na cat\n", encoding="utf-8")
    assert read_prompts(p) == ["a photo of coffee", "a cat"]


@pytest.mark.parametrize(
    "case, content, message",
    [
        ("missing", None, "does not exist"),
        ("empty", b"", "is empty"),
        ("blank", b"  \n\n", "is empty"),
        ("comments", b"# one\n# two\n", "holds no prompts"),
        ("latin1", "caf\u00e9\n".encode("latin-1"), "not UTF-8"),
    ],
)
def test_read_prompts_errors_are_one_line_and_typed(tmp_path, case, content, message):
    p = tmp_path / f"{case}.txt"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(MyError) as info:
        read_prompts(p, error=MyError)
    assert message in str(info.value) and "\n" not in str(info.value) and str(p) in str(info.value)


def test_read_prompts_rejects_a_folder(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        read_prompts(tmp_path)


def test_atomic_write_text_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_atomic_write_text_failure_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    target.write_text("old")
    import attnprobe.core.outputs as outputs

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(outputs.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_replace_dir_swaps_existing_folder(tmp_path):
    final, tmp = tmp_path / "final", tmp_path / "tmp"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    assert replace_dir(tmp, final) == final
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no backup left behind
    other = tmp_path / "other"
    other.mkdir()
    replace_dir(other, tmp_path / "fresh")  # target absent: a plain rename
    assert (tmp_path / "fresh").is_dir() and not other.exists()


def test_staged_output_dir_protects_existing_output(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="--overwrite"):
        with staged_output_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with staged_output_dir(out, overwrite=True) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the partial folder is gone
    with staged_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
