"""gradbrain.data's own entry points: where studies live."""

import pytest

from gradbrain import data


def test_study_path_is_under_the_data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADBRAIN_DATA", str(tmp_path))
    assert data.study_path("demo", "simulated") == tmp_path / "studies" / "demo-simulated"
    assert data.get_data_home() == tmp_path


def test_study_path_prefers_the_users_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.study_path("demo", "nsd", "~/mine") == tmp_path / "mine"


@pytest.mark.parametrize("profile", ["", "params/demo.yaml", 3])
def test_study_path_refuses_a_profile_that_is_not_a_name(profile):
    """Check for a clear error when the profile is a path or not a string."""
    with pytest.raises(ValueError, match="'profile' must be a profile's name"):
        data.study_path(profile, "simulated")


def test_study_path_refuses_an_unknown_dataset():
    with pytest.raises(ValueError, match="dataset"):
        data.study_path("demo", "hcp")
