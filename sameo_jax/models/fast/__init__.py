"""The mask decoder rewritten for speed: the same parameters and the same function as the
reference in models/ (two_way_transformer.py, mask_decoder.py), chosen by
`EfficientSamConfig.decoder_impl = "fast"`. Each file mirrors its reference; the tests in
tests/test_decoder_fast_paths.py hold the two to each other."""
