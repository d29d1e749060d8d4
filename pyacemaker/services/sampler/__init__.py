"""The sampler service: candidate pools and DIRECT selection (step 1), surrogate MD (step 4). No torch here."""
