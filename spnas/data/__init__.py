"""The data layer: COCO detection sets, classification sets for reignition, and the generated
demo scenes."""
