"""The reference model with the shipped SAM on a reference-world scene: masks land on the right objects.

The overlay written here was also inspected by eye (docs/img/grounding_overlay.png is the same rendering).
"""

import pytest
from PIL import Image


pytestmark = pytest.mark.slow  # the shipped reference model and SAM are part of the package: no skip


def test_reference_scene_masks_on_the_right_objects(tmp_path):
    import mmkit
    from mmkit.evals.metrics import mask_iou
    from mmkit.grounding.outputs import write_outputs
    from mmkit.grounding.vlsam import ground_image
    from mmkit.world.questions import ground_truth
    from mmkit.world.scenes import generate_scene

    session = mmkit.load("reference", device="cpu")
    scene = generate_scene(1, 6)  # a red tree and an orange house
    result = ground_image(session, scene.image)
    labels = {d.label for d in result.detections}
    assert labels == {"house", "tree"}, result.answers
    for d in result.detections:
        truth, _ = ground_truth(scene, d.label)
        assert mask_iou(d.mask, truth) >= 0.5, (d.label, d.box)
    paths = write_outputs(scene.image, result, tmp_path, stem="scene6")
    with Image.open(paths["overlay"]) as img:
        assert img.size == (336, 336)
