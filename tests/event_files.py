"""Reads TensorBoard event files back without TensorFlow (for the tests)."""

import pathlib
import struct

from tensorboardX.proto import event_pb2


def read_scalar_events(logdir: pathlib.Path) -> list[tuple[int, str, float]]:
  """(step, tag, value) of every scalar in the event files of ``logdir``.

  Each TFRecord is: uint64 length, uint32 CRC, ``length`` bytes of an Event
  proto, uint32 CRC.
  """
  scalars = []
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    blob, offset = path.read_bytes(), 0
    while offset < len(blob):
      (length,) = struct.unpack_from("<Q", blob, offset)
      event = event_pb2.Event.FromString(
        blob[offset + 12 : offset + 12 + length]
      )
      offset += 12 + length + 4
      scalars += [
        (event.step, v.tag, v.simple_value) for v in event.summary.value
      ]
  return scalars
