"""Manifests as hospital exports make them: each is read like its clean twin, or refused with
one line naming the row (spreadsheet numbering, header = row 1) and the column."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest

from medtl.errors import ManifestError
from medtl.manifest import Manifest, manifest_content_hash, read_manifest, validate_manifest

HEADER = ["image", "label", "patient_id", "site", "age", "note"]
ROWS = [
    ["Röntgen Bilder/patient 1/ä.dcm", "nodule", "007", "Zürich", "63.5", "Müller"],
    ["dicom/p2/IM0001.dcm", "normal", "008", "Genève", "70", "ok"],
    ["dicom/p3/IM0001.dcm", "normal", "009", "Zürich", "41.25", "€ 5"],
]


def _write(path: Path, lines: list[str], encoding: str = "utf-8", newline: str = "\n") -> Path:
    path.write_bytes(newline.join(lines + [""]).encode(encoding))
    return path


def _csv(rows: list[list[str]], sep: str = ",") -> list[str]:
    return [sep.join(r) for r in [HEADER, *rows]]


@pytest.fixture
def clean(tmp_path) -> pd.DataFrame:
    """The table a clean UTF-8, comma-separated export gives (the reference)."""
    return read_manifest(_write(tmp_path / "clean.csv", _csv(ROWS))).df


def _assert_same_table(path: Path, clean: pd.DataFrame, **kwargs) -> None:
    """``path`` reads to exactly the clean table: values, dtypes and table hash."""
    got = read_manifest(path, **kwargs)
    pd.testing.assert_frame_equal(got.df, clean)
    clean_hash = manifest_content_hash(read_manifest(path.with_name("clean.csv")), False)
    assert manifest_content_hash(got, include_files=False) == clean_hash


def _one_line_error(path: Path) -> str:
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_utf8_bom_is_not_kept_in_the_first_column_name(tmp_path, clean):
    bom = _write(tmp_path / "bom.csv", _csv(ROWS), encoding="utf-8-sig")
    assert bom.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_manifest(bom).df.columns[0] == "image"
    _assert_same_table(bom, clean)


def test_semicolon_excel_export_with_decimal_commas_reads_like_the_comma_file(tmp_path, clean):
    # Excel in a decimal-comma locale: ";" between cells, "63,5" for 63.5, CRLF line ends.
    rows = [[c.replace(".", ",") if c[:1].isdigit() else c for c in r] for r in ROWS]
    excel = _write(tmp_path / "excel.csv", _csv(rows, ";"), encoding="utf-8-sig", newline="\r\n")
    _assert_same_table(excel, clean)
    assert read_manifest(excel).df["age"].tolist() == [63.5, 70.0, 41.25]


def test_undecidable_separator_is_a_one_line_error(tmp_path):
    # Two commas and two semicolons outside quotes: nothing tells which one separates.
    p = _write(tmp_path / "mixed.csv", ["image,label;patient_id,site;age", "a,b;c,d;e"])
    message = _one_line_error(p)
    assert "separator" in message and "2 comma(s) and 2 semicolon(s)" in message
    assert "header" in message


def test_latin1_text_is_read_as_cp1252_with_a_warning(tmp_path, clean, caplog):
    latin = _write(tmp_path / "latin.csv", _csv(ROWS, ";"), encoding="cp1252", newline="\r\n")
    with pytest.raises(UnicodeDecodeError):
        latin.read_bytes().decode("utf-8")
    with caplog.at_level(logging.WARNING, logger="medtl"):
        _assert_same_table(latin, clean)
    warned = [r.getMessage() for r in caplog.records if "not UTF-8" in r.getMessage()]
    assert warned and str(latin) in warned[0] and "cp1252" in warned[0]
    assert "byte 0xF6 on line 2" in warned[0]  # the ö of "Röntgen"
    # An explicit encoding is used as given (no warning), and a wrong one is refused.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medtl"):
        _assert_same_table(latin, clean, encoding="cp1252")
    assert not caplog.records
    with pytest.raises(ManifestError, match="is not utf-8: byte 0xF6 on line 2"):
        read_manifest(latin, encoding="utf-8")


def test_utf16_unicode_text_export_reads_like_the_clean_file(tmp_path, clean):
    # Excel's "Unicode text": UTF-16 with a byte-order mark, tab separated.
    p = _write(tmp_path / "unicode.tsv", _csv(ROWS, "\t"), encoding="utf-16", newline="\r\n")
    _assert_same_table(p, clean)


def test_duplicate_column_names_name_both_positions(tmp_path):
    p = _write(tmp_path / "dup.csv", ["image,label,patient_id,label ", "a.dcm,x,1,y"])
    message = _one_line_error(p)
    assert "duplicate column names" in message
    assert "'label' in column 2 (B) and column 4 (D)" in message


def test_blank_rows_are_dropped_counted_and_later_rows_keep_their_numbers(tmp_path, clean, caplog):
    lines = _csv(ROWS)
    # An empty line, an Excel row of empty cells and a row of blanks, between data rows.
    messy = [lines[0], lines[1], "", ",,,,,", lines[2], "  ,  , ,,,", lines[3], ""]
    p = _write(tmp_path / "blank.csv", messy)
    with caplog.at_level(logging.WARNING, logger="medtl"):
        _assert_same_table(p, clean)
    assert any(
        "4 blank row(s) dropped (row 3, row 4, row 6, row 8)" in r.getMessage()
        for r in caplog.records
    )
    # Row numbers in messages are still those of the spreadsheet and of the file.
    report = validate_manifest(read_manifest(p), classes=["normal"], check_files=False)
    unknown = next(e for e in report.errors if e.code == "unknown_label")
    assert "row 2 (line 2 of the file)" in str(unknown) and "column 'label'" in str(unknown)
    m = read_manifest(p)
    assert [m.where(i) for i in range(3)] == [
        "row 2 (line 2 of the file)",
        "row 5 (line 5 of the file)",
        "row 7 (line 7 of the file)",
    ]


def test_quoted_newlines_are_kept_and_a_path_holding_one_is_named(tmp_path):
    lines = _csv(ROWS)
    note = lines[1].replace("Müller", '"Müller,\nsecond line"')
    broken_path = lines[2].replace("dicom/p2/IM0001.dcm", '"dicom/p2/\nIM0001.dcm"')
    p = _write(tmp_path / "nl.csv", [lines[0], note, broken_path, lines[3]])
    m = read_manifest(p)
    assert m.df["note"].iat[0] == "Müller,\nsecond line"
    assert m.df["image"].iat[1] == "dicom/p2/\nIM0001.dcm"
    assert [m.where(i) for i in range(3)] == [
        "row 2 (lines 2-3 of the file)",
        "row 3 (lines 4-5 of the file)",
        "row 4 (line 6 of the file)",
    ]
    report = validate_manifest(m)
    issue = next(e for e in report.errors if e.code == "path_control_character")
    assert issue.rows == (1,) and "\n" not in str(issue)
    assert "row 3 (lines 4-5 of the file), column 'image'" in str(issue)
    assert "'dicom/p2/\\nIM0001.dcm'" in str(issue)
    missing = next(e for e in report.errors if e.code == "missing_file")
    assert 1 not in missing.rows  # reported once, for its real reason


def test_unquoted_separator_in_a_value_names_the_row_and_column(tmp_path):
    lines = _csv(ROWS)
    p = _write(tmp_path / "extra.csv", [lines[0], lines[1], lines[2] + ",Hans", lines[3]])
    message = _one_line_error(p)
    assert "row 3 (line 3 of the file)" in message
    assert "7 cells but the header has 6 columns" in message
    assert "column 7 (G) holds 'Hans'" in message
    # Trailing empty cells (a separator at the end of a row) are no error.
    trailing = _write(tmp_path / "trail.csv", [lines[0], lines[1] + ",", lines[2], lines[3]])
    assert len(read_manifest(trailing).df) == 3


def test_unclosed_quote_names_the_row_and_column_where_it_opens(tmp_path):
    lines = _csv(ROWS)
    p = _write(
        tmp_path / "quote.csv", [lines[0], lines[1], lines[2].replace("ok", '"ok'), lines[3]]
    )
    message = _one_line_error(p)
    assert "row 3 (lines 3-4 of the file), column 'note'" in message
    assert "never closed" in message
    # The same in a ';' export, its header after a blank line (the rows count it).
    semi = [line.replace(",", ";") for line in ["", lines[0], lines[1], lines[2], lines[3]]]
    semi[3] = semi[3].replace("ok", '"ok')
    message = _one_line_error(_write(tmp_path / "quote_semi.csv", semi))
    assert "row 4 (lines 4-5 of the file), column 'note'" in message


def test_paths_with_spaces_and_non_ascii_load_end_to_end(demo_data, tmp_path):
    demo = pd.read_csv(demo_data.manifest_csv, dtype=str)
    files = demo[demo["image"].str.endswith(".dcm")].head(3)
    targets = [
        "Röntgen Bilder/patient 1/ä.dcm",
        "Röntgen Bilder/patient 2/Thorax pa.dcm",
        "Ärzte/Ünter Ordner/ß ø 日本.dcm",
    ]
    for src, dst in zip(files["image"], targets, strict=True):
        (tmp_path / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_data.root / src, tmp_path / dst)
    table = files.assign(image=targets)
    # A cp1252 ';' export cannot hold the Japanese name: that one goes in a UTF-8 file.
    table.to_csv(tmp_path / "utf8.csv", index=False)
    m = read_manifest(tmp_path / "utf8.csv")
    assert m.df["path"].tolist() == [str(tmp_path / t) for t in targets]
    report = validate_manifest(m, deep=True)
    assert report.ok, [str(e) for e in report.errors]
    assert report.summary["images"] == 3
    # The same files from a Latin-1 Excel export with absolute paths.
    latin = table.head(2).assign(image=[str(tmp_path / t) for t in targets[:2]])
    latin.to_csv(tmp_path / "latin.csv", index=False, sep=";", encoding="cp1252")
    assert validate_manifest(read_manifest(tmp_path / "latin.csv"), deep=True).ok


def test_cli_prints_a_hostile_manifest_error_as_one_line(tmp_path):
    from click.testing import CliRunner

    from medtl.cli import main

    p = _write(tmp_path / "dup.csv", ["image;label;patient_id;image", "a.dcm;x;1;b.dcm"])
    result = CliRunner().invoke(main, ["manifest", "validate", str(p)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "'image' in column 1 (A) and column 4 (D)" in lines[0]


def test_table_hash_is_the_row_by_row_definition(tmp_path):
    # The hash is built a column at a time for speed; it must stay the documented one
    # (sorted column names, then each row as JSON of its cells as text, rows sorted).
    import hashlib
    import json

    import numpy as np

    from medtl.manifest.table import _cell

    df = pd.DataFrame(
        {
            "image": ["a b/ä.dcm", 'q"uote.dcm', "c.dcm", "d.dcm"],
            "label": ["x", "y", "x", "y"],
            "patient_id": ["007", "008", "009", "010"],
            "age": [63.5, np.nan, 70.0, 1e20],
            "fold": [0, 1, 2, 3],
            "note": ["line\nbreak", None, "tab\there", "back\\slash"],
        }
    )
    m = Manifest.from_dataframe(df, tmp_path)
    cols = sorted(c for c in m.df.columns if c != "path")
    h = hashlib.sha256(json.dumps(cols).encode())
    rows = sorted(
        json.dumps([_cell(v) for v in row], ensure_ascii=False)
        for row in m.df[cols].itertuples(index=False, name=None)
    )
    for r in rows:
        h.update(r.encode() + b"\n")
    assert manifest_content_hash(m, include_files=False) == h.hexdigest()
