"""Inputs and decoding: image sources from the command line (sources.py), URL downloads (urls.py),
text files (textfile.py), the one opener of local image files (files.py), image decoding and the
reference's preprocessing (images.py), what photos carry besides pixels (photometa.py), the
decode-ahead pipeline (pipeline.py), and the tokenizer (tokenizer.py, spm.py). Importing the package itself is cheap."""
