"""Hostile input to the new features: filter values, duplicates, moves. Each test was a break."""
from __future__ import annotations

import os

import pytest

from altclip_cli.search.filters import FilterError, parse_distance, parse_filter


def test_a_distance_too_large_for_a_float_is_refused_naming_it():
    text = "1" + "0" * 400 + "km"
    with pytest.raises(ValueError, match="not a distance|too large") as info:
        parse_distance(text)
    assert "1000" in str(info.value)


@pytest.mark.parametrize("within", ["0.0000000000000000000000000001m", "123456789.123456789km", "0.5m"])
def test_a_filter_sent_to_a_server_reads_back_the_same(within):
    where = parse_filter(near="0,0", within=within)
    again = parse_filter(**where.as_request())
    assert again == where


def _three_copies(tmp_path, monkeypatch):
    import shutil

    from test_cli import write_image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos" / "a").mkdir(parents=True)
    (tmp_path / "photos" / "b").mkdir()
    kept = write_image(tmp_path / "photos" / "a" / "p.jpg", 1)
    shutil.copy2(kept, tmp_path / "photos" / "b" / "p.jpg")  # cp -p: the same bytes and time
    shutil.copy2(kept, tmp_path / "photos" / "b" / "p copy.jpg")
    return kept


def test_copies_are_not_moved_aside_when_the_kept_photo_is_gone_since_indexing(tmp_path, monkeypatch, model):
    from test_cli import invoke, jsonl

    kept = _three_copies(tmp_path, monkeypatch)
    first = invoke("dupes", "photos", "-m", model, "--precision", "fp32")
    assert first.exit_code == 0, first.stderr
    assert [r["keep"] for r in jsonl(first.stdout)] == [str(kept)]
    kept.rename(tmp_path / "elsewhere.jpg")  # the only photo left is in b/, twice
    result = invoke("dupes", "photos", "--no-index", "--move-to", "aside", "-m", model, "--precision", "fp32")
    assert result.exit_code == 3, result.stderr
    assert sorted(os.listdir(tmp_path / "photos" / "b")) == ["p copy.jpg", "p.jpg"]  # the library keeps the photo
    assert f"{kept}, is no longer there" in result.stderr and "2 not moved (named above)" in result.stderr


@pytest.mark.parametrize("option", ["--move-to", "--restore", "--index"])
def test_an_empty_folder_name_is_refused_not_taken_for_the_current_folder(tmp_path, monkeypatch, model, option):
    from test_cli import invoke

    _three_copies(tmp_path, monkeypatch)
    args = ["--restore", ""] if option == "--restore" else ["photos", option, ""]
    result = invoke("dupes", *args, "-m", model, "--precision", "fp32")
    assert result.exit_code == 2, result.stderr
    assert f"{option} '': an empty name is no folder" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["photos"]
    assert sorted(os.listdir(tmp_path / "photos" / "b")) == ["p copy.jpg", "p.jpg"]


def test_a_symlink_to_a_photo_given_as_a_path_neither_renames_the_photo_in_the_index_nor_finds_nothing(
        tmp_path, monkeypatch, model):
    from test_cli import invoke

    kept = _three_copies(tmp_path, monkeypatch)
    (tmp_path / "link.jpg").symlink_to(kept)
    assert invoke("index", "photos", "-m", model, "--precision", "fp32").exit_code == 0
    via_link = invoke("dupes", "link.jpg", "-m", model, "--precision", "fp32")
    assert via_link.exit_code == 0, via_link.stderr
    assert "renamed" not in via_link.stderr and "no indexed images" not in via_link.stderr
    again = invoke("index", "photos", "-m", model, "--precision", "fp32")
    assert "no changes" in again.stderr, again.stderr  # the photo is still indexed under its own name


def test_restore_from_the_aside_folder_renamed_since_puts_the_photos_back(tmp_path, monkeypatch, model):
    from test_cli import invoke

    _three_copies(tmp_path, monkeypatch)
    moved = invoke("dupes", "photos", "--move-to", "aside", "-m", model, "--precision", "fp32")
    assert moved.exit_code == 0, moved.stderr
    assert sorted(os.listdir(tmp_path / "photos" / "b")) == []
    (tmp_path / "aside").rename(tmp_path / "renamed")  # mv aside renamed
    result = invoke("dupes", "--restore", "renamed")
    assert result.exit_code == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "photos" / "b")) == ["p copy.jpg", "p.jpg"]


def test_a_threshold_that_is_not_a_number_is_a_usage_error_naming_it(tmp_path, monkeypatch, model):
    from test_cli import invoke

    _three_copies(tmp_path, monkeypatch)
    result = invoke("dupes", "photos", "--threshold", "nan", "-m", model, "--precision", "fp32")
    assert result.exit_code == 2, result.stderr
    assert "--threshold nan: not a number" in result.stderr and "unexpected" not in result.stderr


def test_a_min_score_that_is_not_a_number_is_a_usage_error_naming_it(tmp_path, monkeypatch, model):
    from test_cli import invoke

    _three_copies(tmp_path, monkeypatch)
    result = invoke("search", "x", "--dir", "photos", "--min-score", "nan", "--server", "off", "-m", model)
    assert result.exit_code == 2, result.stderr
    assert "--min-score nan: not a number" in result.stderr


def test_an_empty_path_is_named_as_such(tmp_path, monkeypatch, model):
    from test_cli import invoke

    _three_copies(tmp_path, monkeypatch)
    result = invoke("dupes", "", "-m", model, "--precision", "fp32")
    assert result.exit_code == 2 and "error: '': no such file or folder" in result.stderr, result.stderr


def test_the_indexing_line_counts_the_files_below_every_path_given(tmp_path, monkeypatch, model):
    from test_cli import invoke

    _three_copies(tmp_path, monkeypatch)
    result = invoke("dupes", "photos/b", "photos/a", "-m", model, "--precision", "fp32")
    assert result.exit_code == 0, result.stderr
    assert "3 added (3 files," in result.stderr, result.stderr


@pytest.mark.parametrize("args", [["search", "x", "--dir", "photos"], ["index", "photos"],
                                  ["classify", "photos", "-l", "cat"], ["embed", "photos", "-o", "out.npy"],
                                  ["tag", "photos", "-l", "cat"]],
                         ids=["search", "index", "classify", "embed", "tag"])
def test_an_empty_index_name_is_refused_by_every_command(tmp_path, monkeypatch, model, args):
    """The same usage error (exit 2) from every command that takes --index, as from dupes."""
    from test_cli import invoke, write_image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    write_image(tmp_path / "photos" / "a.png", 1)
    result = invoke(*args, "-m", model, "--server", "off", "--index", "")
    assert result.exit_code == 2, result.output
    assert "--index '': an empty name is no folder" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # nothing made in the current folder
