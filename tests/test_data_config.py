"""The ``data`` config section: defaults, augmentation options, errors."""

import pytest

from cifs_jax import data


def test_default_config_is_valid_for_every_dataset():
  for name in data.DATASETS:
    config = data.default_config(name)
    assert config.name == name and config.source == "tfds"
    data.validate(config, "train")


def test_dataset_info():
  info = data.get_info("svhn")
  assert info.tfds_name == "svhn_cropped" and info.num_classes == 10
  assert data.get_info("fashion_mnist").image_shape == (28, 28, 1)
  assert data.get_info("cifar10").class_names[0] == "airplane"


def test_augment_options_defaults_and_overrides():
  def options(name, **augment):
    config = data.default_config(name)
    config.augment.update(augment)
    return data.augment_options(config)

  assert options("cifar10") == {"crop_padding": 4, "flip": True}
  # SVHN as the authors' loader: RandomCrop(32, padding=4) and
  # RandomHorizontalFlip.
  assert options("svhn") == {"crop_padding": 4, "flip": True}
  assert options("fashion_mnist") == {"crop_padding": 0, "flip": False}
  assert options("svhn", flip=False) == {"crop_padding": 4, "flip": False}
  assert options("fashion_mnist", crop_padding=2) == {
    "crop_padding": 2,
    "flip": False,
  }


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("name", "mnist", r"name='mnist'.*\('cifar10', 'svhn', 'fashion_mnist'\)"),
    ("source", "npz", r"source='npz'.*\('tfds', 'files'\)"),
  ],
)
def test_bad_values_list_the_allowed_ones(key, value, message):
  config = data.default_config()
  config[key] = value
  with pytest.raises(ValueError, match=message):
    data.load_split(config, "train")


def test_bad_augment_options():
  config = data.default_config()
  config.augment.crop_padding = -1
  with pytest.raises(
    ValueError, match="crop_padding=-1 must be None or an int >= 0"
  ):
    data.validate(config)


@pytest.mark.parametrize(
  "key,value", [("data_dir", 3), ("augment.flip", "yes")]
)
def test_none_default_keys_are_typed(key, value):
  """Typed placeholders: the command line can set them, and a value of
  another type is refused when set, naming the key."""
  config = data.default_config()
  section, _, name = key.rpartition(".")
  with pytest.raises(TypeError, match=rf"'{name}'.*cannot be casted"):
    (config[section] if section else config)[name] = value


def test_bad_split_and_unknown_keys():
  with pytest.raises(
    ValueError,
    match=r"split='validation'.*\('train', "
    r"'test'\)",
  ):
    data.load_split(data.default_config(), "validation")
  config = data.default_config()
  config.batch_size = 128
  config.augment.mixup = True
  with pytest.raises(
    KeyError, match="Unknown config key 'config.data.augment.mixup'"
  ):
    data.validate(config)
  del config.augment.mixup
  with pytest.raises(
    KeyError, match="Unknown config key 'config.data.batch_size'"
  ):
    data.validate(config)


def test_get_info_of_unknown_dataset():
  with pytest.raises(ValueError, match="Unknown dataset name 'imagenet'"):
    data.get_info("imagenet")
