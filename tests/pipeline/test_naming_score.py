from glied.pipeline.naming import object_named


def test_colour_must_bind_to_shape():
    t = "a small red circle to the left of two blue crosses".split()
    assert object_named(t, "circle", "red")
    assert object_named(t, "cross", "blue")
    assert not object_named(t, "circle", "blue")
    assert not object_named("a red square and a blue circle".split(), "square", "blue")
    assert object_named("a star that is green".split(), "star", "green")
