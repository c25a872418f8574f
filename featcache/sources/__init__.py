"""Readers for the data formats users keep their image sets in, one module per ``--data`` form.

- ``image_folder.py``: ``DIR``, an ImageFolder directory (or a flat one of unlabelled images);
- ``digits.py``: ``sklearn:digits[:train|:test]``; ``idx.py``: ``idx:DIR[:test]`` (MNIST-format files);
- ``torchvision_data.py``: ``torchvision:NAME[:ROOT][:train|:test]``, a torchvision dataset already on disk;
- ``wds.py``: ``wds:PATTERN``, WebDataset tar shards (the ``webdataset`` package: ``featcache[wds]``);
- ``hf.py``: ``hf:PATH[:split]``, a Hugging Face dataset on local disk (``datasets``: ``featcache[hf]``);
- ``path_list.py``: ``csv:FILE`` / ``jsonl:FILE``, image paths and labels listed in a file;
- ``base.py``: what they share (``Sample``, the ``DataSource`` protocol, image decoding, column options);
- ``labels.py``: labels as written (integers, class names) -> int64 labels and class names, shared by all.
``featcache.data.open_source`` parses the spec and picks the reader.
"""
