from __future__ import annotations

import pickle

import numpy as np
import pytest

from selftune.data import split_labelled
from selftune.errors import ConfigError, DataError

IDS = [f"2007_{k:06d}" for k in range(20)]
CITY_IDS = ["aachen/aachen_000000_000019", "aachen/aachen_000001_000019", "bochum/bochum_000000_000313",
            "zurich/zurich_000002_000019"]


def test_count_splits_train_into_disjoint_labelled_and_unlabelled():
    labelled, unlabelled = split_labelled(IDS, 5, seed=0)
    assert len(labelled) == 5 and len(unlabelled) == 15
    assert not set(labelled) & set(unlabelled)
    assert set(labelled) | set(unlabelled) == set(IDS)
    assert unlabelled == [i for i in IDS if i not in labelled]  # the train order is kept


@pytest.mark.parametrize("spec", [5, "5", " 5 ", np.int64(5)])
def test_count_spellings_agree(spec):
    assert split_labelled(IDS, spec, seed=1) == split_labelled(IDS, 5, seed=1)


@pytest.mark.parametrize("spec", ["1/4", 0.25, "0.25", "1 / 4"])
def test_fraction_spellings_agree_and_round_up(spec):
    labelled, _ = split_labelled(IDS, spec, seed=1)
    assert labelled == split_labelled(IDS, 5, seed=1)[0]  # 20 * 1/4 = 5
    assert len(split_labelled(IDS, "1/3", seed=1)[0]) == 7  # ceil(6.67)


def test_fraction_one_labels_everything():
    labelled, unlabelled = split_labelled(IDS, 1.0, seed=0)
    assert sorted(labelled) == IDS and unlabelled == []


@pytest.mark.parametrize(("total", "fraction", "published"), [
    (10582, "1/16", 662), (10582, "1/8", 1323), (10582, "1/4", 2646), (10582, "1/2", 5291),
    (2975, "1/30", 100), (2975, "1/16", 186), (2975, "1/8", 372), (2975, "1/4", 744), (2975, "1/2", 1488),
])
def test_fractions_reproduce_published_split_sizes(total, fraction, published):
    ids = [f"{k:05d}" for k in range(total)]
    assert len(split_labelled(ids, fraction, seed=0)[0]) == published


def test_smaller_labelled_sets_are_nested_in_larger_ones():
    for seed in range(3):
        small, _ = split_labelled(IDS, 3, seed=seed)
        large, _ = split_labelled(IDS, "1/2", seed=seed)
        assert large[:3] == small


def test_selection_is_deterministic_per_seed_and_ignores_input_order():
    first = split_labelled(IDS, 6, seed=7)[0]
    assert split_labelled(list(reversed(IDS)), 6, seed=7)[0] == first
    assert split_labelled(IDS, 6, seed=8)[0] != first


# ---------------------------------------------------------------------------------------------- split files


def test_dst_cbc_file_of_bare_ids_resolved_against_root(tmp_path):
    lists = tmp_path / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "8_labeled_0.txt").write_text("2007_000007\n2007_000003\n\n2007_000011\n")
    labelled, unlabelled = split_labelled(IDS, "ImageSets/Segmentation/8_labeled_0.txt", seed=0, root=tmp_path)
    assert labelled == ["2007_000007", "2007_000003", "2007_000011"]  # file order
    assert len(unlabelled) == 17 and "2007_000003" not in unlabelled


def test_st_plus_plus_image_mask_pairs(tmp_path):
    path = tmp_path / "split_0.txt"
    path.write_text("JPEGImages/2007_000001.jpg SegmentationClass/2007_000001.png\n"
                    "JPEGImages/2007_000019.jpg SegmentationClass/2007_000019.png\n")
    assert split_labelled(IDS, str(path), seed=0)[0] == ["2007_000001", "2007_000019"]


@pytest.mark.parametrize("lines", [
    # U2PL / ST++ / UniMatch
    ["leftImg8bit/train/bochum/bochum_000000_000313_leftImg8bit.png gtFine/train/bochum/"
     "bochum_000000_000313_gtFine_labelTrainIds.png", "leftImg8bit/train/aachen/aachen_000001_000019_leftImg8bit.png"],
    # DST-CBC
    ["bochum/bochum_000000_000313", "aachen/aachen_000001_000019"],
])
def test_cityscapes_split_lines_keep_city_and_name(tmp_path, lines):
    path = tmp_path / "labeled.txt"
    path.write_text("\n".join(lines) + "\n")
    labelled, unlabelled = split_labelled(CITY_IDS, path, seed=0)
    assert labelled == ["bochum/bochum_000000_000313", "aachen/aachen_000001_000019"]
    assert unlabelled == ["aachen/aachen_000000_000019", "zurich/zurich_000002_000019"]


def test_cutmix_pickled_permutation_takes_the_first_n(tmp_path):
    permutation = np.array([4, 17, 2, 9] + [k for k in range(20) if k not in (4, 17, 2, 9)])
    (tmp_path / "split_0.pkl").write_bytes(pickle.dumps(permutation))
    labelled, _ = split_labelled(IDS, "split_0.pkl:3", seed=0, root=tmp_path)
    assert labelled == [IDS[4], IDS[17], IDS[2]]


def test_npy_permutation(tmp_path):
    np.save(tmp_path / "perm.npy", np.arange(19, -1, -1))
    assert split_labelled(IDS, f"{tmp_path / 'perm.npy'}:2", seed=0)[0] == [IDS[19], IDS[18]]


def test_pickle_that_is_not_data_is_refused(tmp_path):
    class Sneaky:
        def __reduce__(self):
            return (print, ("ran code",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Sneaky()))
    with pytest.raises(DataError, match=r"cannot read index file .*evil\.pkl: refusing to load builtins\.print"):
        split_labelled(IDS, "evil.pkl:2", seed=0, root=tmp_path)


def test_index_file_needs_a_count(tmp_path):
    message = r"'split_0\.pkl' is an index file; add the labelled count, e.g. split_0\.pkl:106"
    with pytest.raises(ConfigError, match=message):
        split_labelled(IDS, "split_0.pkl", seed=0, root=tmp_path)


def test_ids_not_in_train_are_named(tmp_path):
    path = tmp_path / "labeled.txt"
    path.write_text("2007_000001\n2011_999999\nJPEGImages/2012_000000.jpg\n2013_1\n2014_1\n")
    message = r"labeled\.txt lists 4 ids not in the train set: 2011_999999, 2012_000000, 2013_1, \.\.\."
    with pytest.raises(DataError, match=message):
        split_labelled(IDS, path, seed=0)


# ---------------------------------------------------------------------------------------------- bad specs


@pytest.mark.parametrize(("spec", "message"), [
    (21, r"labelled split 21 asks for 21 images; the count must be in 1\.\.20"),
    ("0", r"labelled split '0' asks for 0 images; the count must be in 1\.\.20"),
    (-3, r"asks for -3 images"),
    ("3/2", r"labelled split '3/2' is a fraction outside \(0, 1\]"),
    (1.5, r"labelled split 1\.5 is a fraction outside \(0, 1\]"),
    ("0/8", r"is a fraction outside \(0, 1\]"),
    ("1/0", r"labelled split '1/0' divides by zero"),
    ("eighth", r"'eighth' is not a number and no split file .*eighth exists"),
    (True, r"labelled split True is not valid; use a count \(100\), a fraction"),
    (float("nan"), r"labelled split nan is not valid"),
    ("split_0.pkl:many", r"the count after ':' must be an integer"),
])
def test_malformed_specs_say_what_is_valid(tmp_path, spec, message):
    with pytest.raises(ConfigError, match=message):
        split_labelled(IDS, spec, seed=0, root=tmp_path)


# ---------------------------------------------------------------------------------------------- candidates

MASKED = IDS[::4]  # 5 of the 20 train images have masks


def test_candidates_default_to_every_id_with_identical_results(tmp_path):
    (tmp_path / "labeled.txt").write_text("2007_000007\n2007_000003\n")
    np.save(tmp_path / "perm.npy", np.arange(19, -1, -1))
    for spec in (5, "1/3", 0.5, 20, "labeled.txt", "perm.npy:4"):
        for seed in (0, 3):
            plain = split_labelled(IDS, spec, seed=seed, root=tmp_path)
            assert split_labelled(IDS, spec, seed=seed, root=tmp_path, candidates=IDS) == plain
            assert split_labelled(IDS, spec, seed=seed, root=tmp_path, candidates=None) == plain
            assert split_labelled(IDS, spec, seed=seed, root=tmp_path, candidates=list(reversed(IDS))) == plain


def test_counts_draw_from_candidates_and_the_rest_is_unlabelled():
    labelled, unlabelled = split_labelled(IDS, 3, seed=0, candidates=MASKED)
    assert len(labelled) == 3 and set(labelled) <= set(MASKED)
    assert unlabelled == [i for i in IDS if i not in labelled]  # unmasked ids too, in train order
    everything, rest = split_labelled(IDS, 5, seed=0, candidates=MASKED)
    assert sorted(everything) == MASKED and rest == [i for i in IDS if i not in MASKED]


def test_fraction_is_of_the_candidate_count():
    assert len(split_labelled(IDS, "1/2", seed=0, candidates=MASKED)[0]) == 3  # ceil(5 / 2), not 10
    assert sorted(split_labelled(IDS, 1.0, seed=0, candidates=MASKED)[0]) == MASKED


def test_candidate_selection_is_nested_deterministic_and_order_free():
    for seed in range(3):
        small = split_labelled(IDS, 2, seed=seed, candidates=MASKED)[0]
        assert split_labelled(IDS, "4/5", seed=seed, candidates=MASKED)[0][:2] == small
        assert split_labelled(list(reversed(IDS)), 2, seed=seed, candidates=list(reversed(MASKED)))[0] == small


@pytest.mark.parametrize(("spec", "message"), [
    (6, r"labelled split 6 asks for 6 images, but only 5 of the 20 train images have masks; "
        r"the count must be in 1\.\.5"),
    ("0", r"labelled split '0' asks for 0 images, but only 5 of the 20 train images have masks"),
    ("perm.npy:6", r"asks for 6 images, but only 5 of the 20 train images have masks"),
])
def test_count_beyond_the_candidates_says_how_many_have_masks(tmp_path, spec, message):
    np.save(tmp_path / "perm.npy", np.arange(20))
    with pytest.raises(ConfigError, match=message):
        split_labelled(IDS, spec, seed=0, root=tmp_path, candidates=MASKED)


@pytest.mark.parametrize(("spec", "message"), [
    (1, r"labelled split 1 asks for 1 images, but none of the 20 train images has a mask"),
    ("1/8", r"labelled split '1/8' selects no images: none of the 20 train images has a mask"),
])
def test_no_candidates_at_all(spec, message):
    with pytest.raises(ConfigError, match=message):
        split_labelled(IDS, spec, seed=0, candidates=[])


def test_split_file_naming_an_unmasked_id_is_a_data_error(tmp_path):
    path = tmp_path / "labeled.txt"
    path.write_text(f"{MASKED[1]}\n2007_000005\n")
    message = r"split file .*labeled\.txt names 1 id without a mask \(only images with masks can be labelled\): "
    message += r"'2007_000005'$"
    with pytest.raises(DataError, match=message):
        split_labelled(IDS, path, seed=0, candidates=MASKED)
    path.write_text(f"{MASKED[1]}\n{MASKED[0]}\n")
    labelled, unlabelled = split_labelled(IDS, path, seed=0, candidates=MASKED)
    assert labelled == [MASKED[1], MASKED[0]] and len(unlabelled) == 18


def test_index_file_selecting_an_unmasked_id_is_a_data_error(tmp_path):
    np.save(tmp_path / "perm.npy", np.array([0, 1, 4]))  # IDS[1] has no mask
    with pytest.raises(DataError, match=r"index file .*perm\.npy names 1 id without a mask .*: '2007_000001'$"):
        split_labelled(IDS, "perm.npy:2", seed=0, root=tmp_path, candidates=MASKED)
    assert split_labelled(IDS, "perm.npy:1", seed=0, root=tmp_path, candidates=MASKED)[0] == [IDS[0]]


def test_candidates_must_be_train_ids():
    with pytest.raises(ValueError, match=r"candidates must be train ids; 1 are not, e.g. 'elsewhere'"):
        split_labelled(IDS, 1, seed=0, candidates=[IDS[0], "elsewhere"])
