"""`make demo`: preprocessing -> teacher -> MDT-dist student -> generation -> evaluation on one local Ray
instance (`driver.run`)."""
