import torch

from qprune.store import RunDirectory, pack_masks, unpack_masks


def test_masks_pack_to_one_bit_per_weight_and_back():
    g = torch.Generator().manual_seed(0)
    masks = {"a.weight": torch.rand(4, 3, 5, 3, 3, generator=g) > 0.3, "b.weight": torch.rand(7, generator=g) > 0.5}
    packed = pack_masks(masks)
    assert packed["a.weight"].dtype == torch.uint8 and packed["a.weight"].numel() == (4 * 3 * 5 * 9 + 7) // 8
    assert packed["b.weight"].numel() == 1
    back = unpack_masks(packed)
    assert all(torch.equal(back[k], masks[k]) for k in masks)


def test_a_level_is_finished_only_once_its_result_is_written(tmp_path):
    store = RunDirectory(tmp_path)
    masks = {"w": torch.tensor([True, False, True])}
    store.save_level(0, masks, {"w": torch.tensor([1.0, 0.0, 2.0])}, {"row": {"level": 0}})
    (store.level_dir(1)).mkdir(parents=True)
    (store.level_dir(1) / "masks.pt").write_bytes(b"half a file")
    assert [r["row"]["level"] for r in store.finished_levels()] == [0]
    loaded_masks, weights = store.load_level(0)
    assert torch.equal(loaded_masks["w"], masks["w"]) and weights["w"].tolist() == [1.0, 0.0, 2.0]
    assert not list(tmp_path.rglob(".*.tmp*")), "no temporary files left behind"
