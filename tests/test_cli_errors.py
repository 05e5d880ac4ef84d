"""The one CLI error path of both command lines (attnprobe.core.cli)."""
import pytest
from typer.testing import CliRunner

from attnprobe.cli import app as attnprobe_app
from deltadistill.cli import app as deltadistill_app

runner = CliRunner()
APPS = [attnprobe_app, deltadistill_app]


@pytest.mark.parametrize("app", APPS, ids=["attnprobe", "deltadistill"])
def test_version(app):
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and "0.1.0" in result.stdout


def test_user_error_is_one_line_exit_2(tmp_path):
    result = runner.invoke(attnprobe_app, ["analyze", "-p", str(tmp_path / "none.txt"), "-m", "tiny-pixart"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "does not exist" in lines[0]


def test_unexpected_error_is_exit_1_with_a_hint_and_traceback_under_debug(monkeypatch):
    import attnprobe.core.registry as registry

    def boom():
        raise RuntimeError("the disk caught fire\nsecond line")

    monkeypatch.setattr(registry, "aliases", boom)
    result = runner.invoke(attnprobe_app, ["models"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: unexpected RuntimeError: the disk caught fire (rerun with --debug for the traceback)"]
    result = runner.invoke(attnprobe_app, ["--debug", "models"])
    assert result.exit_code == 1 and "Traceback" in result.stderr and "the disk caught fire" in result.stderr


def test_deltadistill_shares_the_path(tmp_path):
    result = runner.invoke(deltadistill_app, ["generate", "--distilled", str(tmp_path), "--prompts", str(tmp_path / "p.txt"),
                                              "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
