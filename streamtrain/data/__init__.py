"""The data side: from a dataset's files to the symbols a sample learns, read from any raw position.

* ``stream.py``: ``DatasetStream``, the streamed ``datasets`` dataset read from a raw offset, filtered, in order.
* ``textfilter.py``: a record's text, or the reason it is filtered; the check of a run's first records.
* ``readerror.py``: where a read failed (the file and the record), and what to do.
* ``datafiles.py``: the dataset's identity, the files a run's raw positions refer to, and what a resume allows to
  change (the record a checkpoint holds is ``records/dataset.py``).
* ``tokenization.py``: text to string symbols (words, GPT-2's BPE, a Hugging Face tokenizer).

It reads files, never a server: nothing under this package imports the client side or the server
(``tests/test_layering.py``).
"""
