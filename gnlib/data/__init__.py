"""The data: corpora and their documents, tokenizers, and the batch sources a run trains on.

Layers, each importing only those above it: ``tokenizers`` (bytes, T5, BPE), ``hub`` (the Hugging Face
hub, its two loaders), ``windows`` (random windows, the teaching notebooks' batches), ``stream`` (the
study's packed stream), ``corpus`` (sources → documents → deterministic split → tokens), ``source`` (the
:class:`BatchSource` protocol both batch kinds implement) and ``pipeline`` (a RunSpec's data).
"""

from gnlib.data.corpus import (
    DEFAULT_MAX_BYTES,
    DOCUMENT_SEPARATOR,
    SOURCE_FORMS,
    SPLITS,
    Corpus,
    check_corpus_source,
    encode_documents,
    frequency_remap,
    load_corpus,
    load_documents,
    split_indices,
)
from gnlib.data.source import BatchSource
from gnlib.data.stream import PackedStream, StreamExhausted, shuffled_documents, tensor_documents
from gnlib.data.tokenizers import TOKENIZER_FORMS, ByteTokenizer, HFTokenizer, Tokenizer, make_tokenizer
from gnlib.data.windows import BatchSampler

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DOCUMENT_SEPARATOR",
    "SOURCE_FORMS",
    "SPLITS",
    "TOKENIZER_FORMS",
    "BatchSampler",
    "BatchSource",
    "ByteTokenizer",
    "Corpus",
    "HFTokenizer",
    "PackedStream",
    "StreamExhausted",
    "Tokenizer",
    "check_corpus_source",
    "encode_documents",
    "frequency_remap",
    "load_corpus",
    "load_documents",
    "make_tokenizer",
    "shuffled_documents",
    "split_indices",
    "tensor_documents",
]
