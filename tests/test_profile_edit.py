"""The chat page's profile editor underneath: rename, delete and set the default profile in a modelfile's text,
every other line and comment kept, the result loaded back as exactly the expected spec."""

from __future__ import annotations

import pytest

from avgguf.config.modelfile import ModelfileError, load_modelfile
from avgguf.config.profile_edit import delete_profile, rename_profile, set_default_profile


@pytest.fixture()
def modelfile(tiny_kit, tmp_path):
    root, *_ = tiny_kit
    text = (root / "tiny.yaml").read_text()
    for rel in ("med/base.gguf", "medical.gguf", "legal.gguf"):
        text = text.replace(rel, str(root / rel))
    text = text.replace("profiles:\n", "# my knobs\nprofiles:\n  # the careful one\n", 1)
    text = text.replace("  mixed:\n", "  mixed:  # half and half\n    decode: pad\n", 1)
    path = tmp_path / "edit.yaml"
    path.write_text("# top comment\n" + text + "# tail comment\n")
    return path


def test_rename_delete_and_default(modelfile):
    mf = load_modelfile(modelfile)
    assert mf.spec.profile_decode == {"mixed": "pad"}
    mf = set_default_profile(mf, "mixed")
    assert load_modelfile(modelfile).spec.default_profile == "mixed" == mf.spec.default_profile
    mf = rename_profile(mf, "mixed", "blend")
    disk = load_modelfile(modelfile)
    assert disk.spec.profiles == {"expert-medical": {"medical": 1.0, "legal": 0.0}, "blend": {"medical": 0.5, "legal": -1.0}}
    assert disk.spec.default_profile == "blend" and disk.spec.profile_decode == {"blend": "pad"}
    assert mf.spec.model_dump() == disk.spec.model_dump()
    text = modelfile.read_text()
    for kept in ("# top comment", "# my knobs", "# the careful one", "blend:  # half and half", "# tail comment"):
        assert kept in text
    mf = delete_profile(mf, "blend")
    disk = load_modelfile(modelfile)
    assert disk.spec.profiles == {"expert-medical": {"medical": 1.0, "legal": 0.0}}
    assert disk.spec.default_profile is None and disk.spec.profile_decode == {} and "default_profile" not in modelfile.read_text()
    assert mf.spec.model_dump() == disk.spec.model_dump()
    set_default_profile(mf, "expert-medical")
    set_default_profile(mf, None)
    assert load_modelfile(modelfile).spec.default_profile is None and "# tail comment" in modelfile.read_text()


def test_refusals_leave_the_file_alone(modelfile, tmp_path):
    mf = load_modelfile(modelfile)
    before = modelfile.read_text()
    for call, words in (
        (lambda: delete_profile(mf, "nope"), "not in the modelfile"),
        (lambda: rename_profile(mf, "mixed", "expert-medical"), "exists already"),
        (lambda: rename_profile(mf, "mixed", "bad name!"), "profile name"),
        (lambda: set_default_profile(mf, "nope"), "not in the modelfile"),
    ):
        with pytest.raises(ModelfileError, match=words):
            call()
    assert modelfile.read_text() == before
    flow = tmp_path / "flow.yaml"
    flow.write_text(before.split("# my knobs")[0] + "profiles: {mixed: {medical: 0.5, legal: -1.0}}\n")
    with pytest.raises(ModelfileError, match="by hand"):
        delete_profile(load_modelfile(flow), "mixed")
