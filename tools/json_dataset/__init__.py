"""The JSON-extraction demo dataset generator (`tools/make_json_dataset.py` is its command line).

`vocab.py` and `templates.py` hold the words and sentence frames, each list split into a training
and a novel pool before anything is generated; `wording.py` writes numbers, dates and names in
their many styles; `records.py` turns them into chat samples.
"""
