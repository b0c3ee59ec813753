"""storage: places on local disk and under URLs, and the --storage-options a user passes for them."""

from __future__ import annotations

from pathlib import Path

import pytest

from openmind_tools.cli.convert import main
from openmind_tools.storage import Place, load_storage_options, transport_error


def test_storage_options_come_inline_or_from_a_json_or_toml_file(tmp_path: Path) -> None:
    assert load_storage_options('{"endpoint_url": "http://x:9000", "anon": true}') == {
        "endpoint_url": "http://x:9000", "anon": True}  # fmt: skip
    (tmp_path / "s3.json").write_text('{"key": "k", "secret": "s"}')
    assert load_storage_options(str(tmp_path / "s3.json")) == {"key": "k", "secret": "s"}
    (tmp_path / "s3.toml").write_text('endpoint_url = "http://x:9000"\n[client_kwargs]\nregion_name = "eu"\n')
    assert load_storage_options(str(tmp_path / "s3.toml")) == {"endpoint_url": "http://x:9000",
                                                               "client_kwargs": {"region_name": "eu"}}  # fmt: skip
    assert load_storage_options(None) == {}


@pytest.mark.parametrize(
    ("text", "says"),
    [("{not json", "not valid JSON"), ("missing.json", "cannot read"), ("bad.toml", "not valid TOML"),
     ("list.json", "expected a JSON/TOML table")],
)  # fmt: skip
def test_bad_storage_options_exit_2_in_one_line(
    text: str, says: str, tmp_path: Path, demo_corpus: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.toml").write_text("= no key")
    (tmp_path / "list.json").write_text("[1, 2]")
    assert main([str(demo_corpus), str(tmp_path / "out"), "--storage-options", text, "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_local_place_is_written_whole_and_its_folders_made(tmp_path: Path) -> None:
    place = Place.of(f"file://{tmp_path}") / "a" / "b.bin"
    assert place.local and place.url == f"{tmp_path}/a/b.bin"
    with pytest.raises(RuntimeError), place.writer() as f:
        f.write(b"half")
        raise RuntimeError("killed mid-write")
    assert not place.is_file() and list((tmp_path / "a").iterdir()) == []  # no half file, no temporary left
    place.write_bytes(b"whole")
    assert place.read_bytes() == b"whole" and place.size() == 5 and place.parent.is_dir()
    assert (Place.of(tmp_path) / "a").find() == [f"{tmp_path}/a/b.bin"]
    place.remove()
    place.remove()  # nothing there is no error
    assert not place.is_file()


def test_what_counts_as_a_failed_request() -> None:
    assert transport_error(ConnectionResetError()) and transport_error(TimeoutError())
    assert not transport_error(FileNotFoundError("gone")) and not transport_error(PermissionError("no"))
    assert not transport_error(ValueError("a bug"))
