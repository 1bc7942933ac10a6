"""The README's method table is generated from the registry (python -m mergekitty.methods.table)."""

from pathlib import Path

from mergekitty.methods.registry import all_methods
from mergekitty.methods.table import main, markdown_table, readme_section, replace_section

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_is_generated_from_registry():
    assert readme_section(README.read_text()) == markdown_table(), (
        "run: python -m mergekitty.methods.table --write README.md"
    )


def test_every_method_has_a_row_with_its_defaults():
    table = markdown_table()
    for m in all_methods():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{m.name}`"))
        assert m.pretty_name in row
        for spec in (*m.global_params, *m.model_params):
            assert f"`{spec.name}`" in row
    ties = next(line for line in table.splitlines() if line.startswith("| `ties`"))
    assert "`normalize` = true" in ties and "`density` = 1" in ties and "`weight` (required)" in ties


def test_write_replaces_only_the_section(tmp_path, capsys):
    p = tmp_path / "README.md"
    p.write_text("intro\n<!-- methods:begin -->\nold\n<!-- methods:end -->\noutro\n")
    main(["--write", str(p)])
    text = p.read_text()
    assert text.startswith("intro\n<!-- methods:begin -->\n| `merge_method`") and text.endswith(
        "<!-- methods:end -->\noutro\n"
    )
    assert replace_section(text, markdown_table()) == text
    main([])
    assert capsys.readouterr().out == markdown_table()
