"""Pure core of the agent: frames, decoding, preprocessing, verdicts, features."""
