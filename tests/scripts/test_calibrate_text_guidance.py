"""The guidance calibration's choice rule and the text-edit benchmark's guidance arguments."""

import pytest

from benchmarks.text_edits import guidance_kwargs, parse_scales
from scripts.calibrate_text_guidance import calibration_rows, choose_scale


def test_clear_psnr_winner_is_chosen_even_with_less_structure():
    psnrs = {2.0: 21.40, 3.0: 21.85}
    structures = {2.0: 0.97, 3.0: 0.96}
    assert choose_scale(psnrs, structures, tie_db=0.05) == 3.0


def test_tied_scales_go_to_the_one_keeping_more_structure():
    # the shipped t2i's FPE row on training photos (session 9): 2.5 and 3 within 0.01 dB
    psnrs = {2.0: 21.69, 2.5: 21.91, 3.0: 21.92, 3.5: 21.76}
    structures = {2.0: 0.9704, 2.5: 0.9664, 3.0: 0.9620, 3.5: 0.9573}
    assert choose_scale(psnrs, structures, tie_db=0.05) == 2.5
    assert choose_scale(psnrs, structures, tie_db=0.0) == 3.0


def test_siminversion_gets_a_row_per_shared_scale_and_the_rule_chooses_over_rows_and_scales():
    assert calibration_rows(["ddim_p2p", "siminversion"], "0.5") == {
        "ddim_p2p": ("ddim_p2p", 0.5), "siminversion": ("siminversion", 0.5)}
    rows = calibration_rows(["siminversion", "fpe"], "0.5,1")
    assert rows == {"siminversion w=0.5": ("siminversion", 0.5), "siminversion w=1": ("siminversion", 1.0),
                    "fpe": ("fpe", 0.5)}
    with pytest.raises(SystemExit, match="'x' is not a number"):
        calibration_rows(["siminversion"], "0.5,x")
    # the session-10 sweep: shared 1 at w_tgt 3 is 0.02 dB above shared 0.5, tied; 0.5 keeps structure
    cells = {("w=0.5", 3.0): 21.69, ("w=1", 3.0): 21.71, ("w=1", 2.0): 21.30}
    kept = {("w=0.5", 3.0): 0.9626, ("w=1", 3.0): 0.9625, ("w=1", 2.0): 0.970}
    assert choose_scale(cells, kept, tie_db=0.05) == ("w=0.5", 3.0)


def test_guidance_kwargs_reads_one_scale_per_method():
    assert guidance_kwargs("siminversion", 3) == {"w_inv": 0.5, "w_src": 0.5, "w_tgt": 3}
    assert guidance_kwargs("siminversion", 3, shared=1.0) == {"w_inv": 1.0, "w_src": 1.0, "w_tgt": 3}
    assert guidance_kwargs("ddim_p2p", 2) == {"w_inv": 1.0, "w_src": 2, "w_tgt": 2}
    assert guidance_kwargs("fpe", 2.5) == {"w_src": 2.5, "w_tgt": 2.5}
    with pytest.raises(ValueError, match="regenerate"):
        guidance_kwargs("regenerate", 3)


def test_parse_scales_names_the_bad_item():
    assert parse_scales(["fpe=2.5"], ["ddim_p2p", "fpe"]) == {"fpe": 2.5}
    with pytest.raises(SystemExit, match="'fpe'"):
        parse_scales(["fpe"], ["fpe"])
    with pytest.raises(SystemExit, match="not among --methods"):
        parse_scales(["siminversion=3"], ["fpe"])
    with pytest.raises(SystemExit, match="'x' is not a number"):
        parse_scales(["fpe=x"], ["fpe"])
