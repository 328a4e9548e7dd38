"Odd and broken images through `load_image`: every one either loads as upright RGB or fails with a named reason."
import io, struct, zlib

import numpy as np
import pytest
from PIL import Image

from anime_pose.core import ImageError, atomic_path, image_grid, images_to_tensor, load_image, tensor_to_images


def encode(image: Image.Image, format: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **params)
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    "A tiny PNG whose header claims `width` x `height` pixels (a decompression bomb's header)."
    data = bytearray(encode(Image.new('L', (1, 1)), 'PNG'))
    ihdr = data[12:29]  # b'IHDR' + 13 bytes of fields
    ihdr[4:12] = struct.pack('>II', width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack('>I', zlib.crc32(bytes(ihdr)))
    return bytes(data)


# ---- inputs that must load, and what they must load as ----

def test_rgba_composited_over_white():
    image = Image.new('RGBA', (3, 3), (10, 20, 30, 0))
    assert load_image(encode(image, 'PNG')).getpixel((1, 1)) == (255, 255, 255)


def test_grayscale_with_alpha():
    image = Image.new('LA', (3, 3), (0, 255))
    image.putpixel((0, 0), (0, 0))
    loaded = load_image(encode(image, 'PNG'))
    assert loaded.mode == 'RGB'
    assert loaded.getpixel((1, 1)) == (0, 0, 0) and loaded.getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparent_index():
    image = Image.new('P', (4, 4), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    loaded = load_image(encode(image, 'PNG', transparency=0))
    assert loaded.getpixel((0, 0)) == (255, 255, 255) and loaded.getpixel((2, 2)) == (255, 0, 0)


def test_one_bit_and_grayscale():
    assert load_image(encode(Image.new('1', (5, 5), 1), 'PNG')).getpixel((2, 2)) == (255, 255, 255)
    assert load_image(encode(Image.new('L', (5, 5), 77), 'PNG')).getpixel((2, 2)) == (77, 77, 77)


def test_cmyk_jpeg():
    loaded = load_image(encode(Image.new('CMYK', (8, 8), (0, 255, 255, 0)), 'JPEG', quality=95))
    red, green, blue = loaded.getpixel((4, 4))
    assert loaded.mode == 'RGB' and red > 240 and green < 20 and blue < 20


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    loaded = load_image(encode(Image.fromarray(values), 'PNG'))
    assert [loaded.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_float_tiff():
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    loaded = load_image(encode(Image.fromarray(values, 'F'), 'TIFF'))
    assert [loaded.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_animated_gif_gives_first_frame():
    frames = [Image.new('RGB', (6, 6), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], 'GIF', save_all=True, append_images=frames[1:], duration=100)
    assert load_image(data).getpixel((3, 3)) == (255, 0, 0)


@pytest.mark.parametrize('orientation, size', [(1, (6, 2)), (3, (6, 2)), (6, (2, 6)), (8, (2, 6))])
def test_exif_orientation(orientation, size):
    exif = Image.Exif()
    exif[0x0112] = orientation
    assert load_image(encode(Image.new('RGB', (6, 2)), 'JPEG', exif=exif)).size == size


def test_webp_with_alpha():
    image = Image.new('RGBA', (4, 4), (0, 0, 0, 0))
    assert load_image(encode(image, 'WEBP', lossless=True)).getpixel((1, 1)) == (255, 255, 255)


def test_paths_bytes_and_images_agree(tmp_path):
    image = Image.new('RGB', (5, 4), (1, 2, 3))
    (tmp_path / 'a.png').write_bytes(encode(image, 'PNG'))
    from_path, from_str = load_image(tmp_path / 'a.png'), load_image(str(tmp_path / 'a.png'))
    from_bytes, from_image = load_image(encode(image, 'PNG')), load_image(image)
    assert {im.tobytes() for im in (from_path, from_str, from_bytes, from_image)} == {image.tobytes()}


def test_wrong_extension_is_read_by_content(tmp_path):
    (tmp_path / 'character.jpg').write_bytes(encode(Image.new('RGB', (3, 3), (9, 9, 9)), 'PNG'))
    assert load_image(tmp_path / 'character.jpg').getpixel((0, 0)) == (9, 9, 9)


# ---- inputs that must be refused, with the file and the reason ----

def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="missing.png': no such file"): load_image(tmp_path / 'missing.png')


def test_directory(tmp_path):
    with pytest.raises(ImageError, match='is a directory'): load_image(tmp_path)


def test_zero_byte_file(tmp_path):
    (tmp_path / 'empty.png').write_bytes(b'')
    with pytest.raises(ImageError, match=r"empty.png': file is empty \(0 bytes\)"): load_image(tmp_path / 'empty.png')


def test_empty_bytes():
    with pytest.raises(ImageError, match='no image data'): load_image(b'')


def test_text_file_named_png(tmp_path):
    (tmp_path / 'notes.png').write_text('This is a bad image.')
    with pytest.raises(ImageError, match="notes.png': not an image"): load_image(tmp_path / 'notes.png')


@pytest.mark.parametrize('format', ['PNG', 'JPEG', 'WEBP', 'GIF'])
def test_truncated(tmp_path, format):
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), format)
    (tmp_path / f'cut.{format.lower()}').write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=f"cut.{format.lower()}': image data is truncated or corrupt"):
        load_image(tmp_path / f'cut.{format.lower()}')


def test_corrupt_middle():
    rng = np.random.default_rng(1)
    data = bytearray(encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), 'PNG'))
    data[200:400] = bytes(200)
    with pytest.raises(ImageError, match='truncated or corrupt'): load_image(bytes(data))


def test_decompression_bomb():
    with pytest.raises(ImageError, match='decompression bomb'): load_image(png_claiming_size(100_000, 100_000))


def test_max_pixels_is_configurable():
    image = encode(Image.new('RGB', (100, 100)), 'PNG')
    with pytest.raises(ImageError, match='100x100 pixels, limit 1000'): load_image(image, max_pixels=1000)


def test_image_with_no_pixels():
    with pytest.raises(ImageError, match=r'no pixels \(0x5\)'): load_image(Image.new('RGB', (0, 5)))


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)


# ---- helpers the rest of the library relies on ----

def test_image_round_trip_and_resizing(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8))
    image.save(tmp_path / 'a.png')
    x = images_to_tensor([image, tmp_path / 'a.png'], size=12)
    assert x.shape == (2, 3, 12, 12) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(np.asarray(tensor_to_images(x)[1]), np.asarray(image))
    assert images_to_tensor([image], size=4).shape == (1, 3, 4, 4)
    with pytest.raises(ImageError, match='no such file'): images_to_tensor([tmp_path / 'missing.png'])
    with pytest.raises(ImageError, match='no images'): images_to_tensor([])


def test_image_grid_resizes_to_first_image():
    grid = image_grid([Image.new('RGB', (4, 4)), Image.new('RGB', (8, 8), (255, 0, 0))], padding=0)
    assert grid.size == (8, 4) and grid.getpixel((6, 2)) == (255, 0, 0)


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / 'result.txt'
    target.write_text('good')
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text('half')
            raise RuntimeError('killed')
    assert target.read_text() == 'good' and [p.name for p in tmp_path.iterdir()] == ['result.txt']
