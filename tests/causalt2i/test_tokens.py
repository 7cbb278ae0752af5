import torch

from causalt2i.models import load_sdxl
from causalt2i.tokens import add_identifier_tokens, class_word_rows, identifier_embeddings
from causalt2i.trainer import Trainer


def test_new_tokens_get_the_same_id_in_both_tokenizers_and_start_from_the_class_word():
    parts = load_sdxl("tiny")
    tables_before = [parts.text_encoder.get_input_embeddings().weight.clone(), parts.text_encoder_2.get_input_embeddings().weight.clone()]
    ids = add_identifier_tokens(parts, ["<s1>", "<v1>"], ["cat", "dog"])
    assert ids == parts.tokenizer.convert_tokens_to_ids(["<s1>", "<v1>"]) == parts.tokenizer_2.convert_tokens_to_ids(["<s1>", "<v1>"])
    assert ids == [len(parts.tokenizer) - 2, len(parts.tokenizer) - 1]
    for tokenizer, module, before in zip((parts.tokenizer, parts.tokenizer_2), identifier_embeddings(parts), tables_before):
        cat = before[tokenizer("cat", add_special_tokens=False)["input_ids"]].mean(0)
        dog = before[tokenizer("dog", add_special_tokens=False)["input_ids"]].mean(0)
        assert torch.equal(module.rows[0], cat)
        assert torch.equal(module.rows[1], dog)
        # The embedding lookup returns the trainable row for the new id and the frozen table elsewhere.
        looked_up = module(torch.tensor([[ids[1], 5]]))
        assert torch.equal(looked_up[0, 0], module.rows[1]) and torch.equal(looked_up[0, 1], before[5])


def test_class_word_rows_average_multi_token_words():
    parts = load_sdxl("tiny")
    table = parts.text_encoder.get_input_embeddings()
    ids = parts.tokenizer("teapot", add_special_tokens=False)["input_ids"]
    assert torch.equal(class_word_rows(parts.tokenizer, table, "teapot"), table.weight[ids].mean(0))


def test_training_changes_only_the_new_rows_of_both_tables(spec, tmp_path):
    trainer = Trainer(spec, tmp_path / "run")
    modules = identifier_embeddings(trainer.model.parts)
    before = [m.base.weight.detach().clone() for m in modules]
    rows_before = [m.rows.detach().clone() for m in modules]
    for _ in range(3):
        trainer.train_step()
    for module, table, rows in zip(modules, before, rows_before):
        assert torch.equal(module.base.weight, table), "a frozen row of the embedding table moved"
        assert not torch.equal(module.rows, rows), "the identifier rows did not train"
        # The full table as the model sees it: only the identifier ids differ from the original.
        ids = torch.arange(table.shape[0])
        seen = module(ids.unsqueeze(0))[0]
        changed = (seen != table).any(-1)
        assert set(torch.nonzero(changed).flatten().tolist()) == set(module.token_ids.tolist())
