"""``split_selection``: the val images that choose checkpoints (and that a search optimises),
drawn out of the reported val set (issue 11's ``data.selection``)."""

from __future__ import annotations

import pytest

from selftune.data import split_labelled, split_selection
from selftune.errors import ConfigError, DataError

VAL = [f"2008_{k:06d}" for k in range(30)]


def test_val_selects_on_the_whole_reported_set():
    selection, reported = split_selection(VAL, "val", seed=0)
    assert selection == VAL and reported == VAL


def test_count_draws_that_many_and_removes_them_from_the_reported_set():
    selection, reported = split_selection(VAL, 20, seed=0)
    assert len(selection) == 20 and len(reported) == 10
    assert not set(selection) & set(reported)
    assert set(selection) | set(reported) == set(VAL)
    assert reported == [i for i in VAL if i not in selection]  # val order kept


def test_draw_is_deterministic_per_seed_nested_and_ignores_input_order():
    first = split_selection(VAL, 5, seed=3)
    assert split_selection(VAL, 5, seed=3) == first
    assert split_selection(list(reversed(VAL)), 5, seed=3)[0] == first[0]
    assert split_selection(VAL, 5, seed=4)[0] != first[0]
    assert split_selection(VAL, 12, seed=3)[0][:5] == first[0]  # a smaller selection is a prefix


def test_draw_is_the_labelled_splits_draw():
    # One seeded draw rule for the whole package: what the docs say of split_labelled holds here.
    assert split_selection(VAL, 7, seed=11)[0] == split_labelled(VAL, 7, seed=11)[0]


@pytest.mark.parametrize("spec", ["1/10", 0.1, "0.1", " 1 / 10 "])
def test_fraction_spellings_agree(spec):
    assert split_selection(VAL, spec, seed=2) == split_selection(VAL, 3, seed=2)  # 30 / 10 = 3


def test_fraction_rounds_up_like_the_labelled_split():
    assert len(split_selection(VAL, "1/7", seed=0)[0]) == 5  # ceil(30 / 7) = ceil(4.29)
    assert len(split_selection(VAL[:10], "1/3", seed=0)[0]) == 4  # ceil(3.33)
    assert len(split_selection(VAL[:10], "1/100", seed=0)[0]) == 1  # never empty


@pytest.mark.parametrize(("spec", "size", "says"), [
    (30, 30, "selects 30 of the 30 val images; the count must be in 1..29"),
    ("31", 30, "selects 31 of the 30 val images; the count must be in 1..29"),
    ("29/30", 30, None),  # 29 of 30: allowed, one image left to report
    ("99/100", 30, "selects 30 of the 30 val images"),  # ceil(29.7) = 30 leaves none
    (1.0, 30, "outside (0, 1)"),
    ("1/1", 30, "outside (0, 1)"),
    (1, 1, "the val set has 1 image(s), too few"),
])
def test_selection_leaving_nothing_to_report_is_an_error(spec, size, says):
    if says is None:
        assert len(split_selection(VAL[:size], spec, seed=0)[1]) == 1
        return
    with pytest.raises(ConfigError, match=r"^data\.selection = ") as error:
        split_selection(VAL[:size], spec, seed=0)
    assert says in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("spec", [0, -3, "0", "0/5", 0.0, -0.5, "3/0", True, "1.5", float("nan"), [1, 2]])
def test_bad_numbers_name_the_key(spec):
    with pytest.raises(ConfigError, match=r"^data\.selection = ") as error:
        split_selection(VAL, spec, seed=0)
    assert "\n" not in str(error.value)


def test_count_in_range_for_a_tiny_val_set():
    selection, reported = split_selection(VAL[:2], 1, seed=0)
    assert len(selection) == 1 and len(reported) == 1


def test_split_file_relative_to_the_root(tmp_path):
    (tmp_path / "splits").mkdir()
    listed = [VAL[4], VAL[0], VAL[17]]
    # The forms labelled split files take: bare ids, comments, image/mask path pairs.
    (tmp_path / "splits" / "valtiny.txt").write_text(
        f"# selection\n{VAL[4]}\n\nJPEGImages/{VAL[0]}.jpg SegmentationClass/{VAL[0]}.png\n{VAL[17]}\n"
    )
    selection, reported = split_selection(VAL, "splits/valtiny.txt", seed=0, root=tmp_path)
    assert selection == listed  # file order
    assert reported == [i for i in VAL if i not in listed]
    # The seed plays no part for a file; an absolute path or a Path works too.
    assert split_selection(VAL, tmp_path / "splits" / "valtiny.txt", seed=9) == (selection, reported)


def test_split_file_with_an_id_missing_from_val_names_it(tmp_path):
    (tmp_path / "sel.txt").write_text(f"{VAL[0]}\n2007_999999\n")
    with pytest.raises(ConfigError, match=r"^data\.selection: split file .*sel\.txt lists 1 id\(s\) not in the val set: 2007_999999$"):
        split_selection(VAL, "sel.txt", seed=0, root=tmp_path)


def test_split_file_with_a_repeated_id_is_an_error(tmp_path):
    (tmp_path / "sel.txt").write_text(f"{VAL[0]}\n{VAL[1]}\nJPEGImages/{VAL[0]}.jpg\n")
    with pytest.raises(ConfigError, match=rf"^data\.selection: split file .*sel\.txt lists {VAL[0]} more than once$"):
        split_selection(VAL, "sel.txt", seed=0, root=tmp_path)


def test_split_file_listing_all_of_val_or_nothing_is_an_error(tmp_path):
    (tmp_path / "all.txt").write_text("\n".join(VAL))
    (tmp_path / "none.txt").write_text("# nothing\n")
    with pytest.raises(ConfigError, match=r"^data\.selection: split file .*all\.txt lists all 30 val images"):
        split_selection(VAL, "all.txt", seed=0, root=tmp_path)
    with pytest.raises(ConfigError, match=r"^data\.selection: split file .*none\.txt lists no ids$"):
        split_selection(VAL, "none.txt", seed=0, root=tmp_path)


def test_missing_split_file_names_the_key_and_the_path(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.selection = 'valtiny\.txt' is not a number and no split file .*valtiny\.txt exists"):
        split_selection(VAL, "valtiny.txt", seed=0, root=tmp_path)


def test_cityscapes_style_ids_from_paths(tmp_path):
    val = ["frankfurt/frankfurt_000000_000294", "lindau/lindau_000000_000019", "munster/munster_000000_000019"]
    (tmp_path / "sel.txt").write_text("leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png\n")
    assert split_selection(val, "sel.txt", seed=0, root=tmp_path) == ([val[1]], [val[0], val[2]])


def test_repeated_val_ids_are_a_data_error():
    with pytest.raises(DataError, match="val ids are not unique"):
        split_selection([VAL[0], VAL[0], VAL[1]], 1, seed=0)
