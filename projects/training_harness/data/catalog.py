"""
Registration in detectron2's DatasetCatalog and MetadataCatalog that is safe to repeat.

setup() registers the project's datasets in every process, and a test or a notebook registers
them again with other arguments; detectron2's catalogs refuse a name twice. A
:class:`DatasetRegistry` remembers what one registrar (the synthetic datasets, the users' COCO
datasets) registered and from which definition (the hashable arguments the dataset is a function
of), so that registering a name again

- from the same definition does nothing,
- from another definition replaces this registrar's own entries (dataset and metadata),
- over a name that other code registered (detectron2's built-in datasets, the other registrar)
  is refused, naming the dataset.

:meth:`DatasetRegistry.register_once` does it in one call; a registrar that checks files before it
registers calls :meth:`~DatasetRegistry.holds` first and checks only when that says False
(data/register.py). :func:`coco_metadata` is the metadata both set up front, loading nothing.
"""
from collections.abc import Hashable, Mapping
from typing import Any, Callable, Dict, Iterable, Iterator, List, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["DatasetRegistry", "coco_metadata"]


def coco_metadata(json_file: str, image_root: str, categories: Iterable[Tuple[int, str]]
                  ) -> Dict[str, Any]:
    """The metadata of a COCO instances dataset whose (category id, name) pairs are
    ``categories`` in id order: the values detectron2's load_coco_json sets when it loads the
    json (which MetadataCatalog then accepts), known before, so that the class count can be
    checked and predictions mapped back without loading the dataset."""
    categories = list(categories)
    return dict(
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
        thing_classes=[name for _, name in categories],
        thing_dataset_id_to_contiguous_id={i: k for k, (i, _) in enumerate(categories)},
    )


class DatasetRegistry(Mapping):
    """Name -> definition of every dataset this registrar has registered."""

    def __init__(self) -> None:
        self._definitions: Dict[str, Hashable] = {}

    def __getitem__(self, name: str) -> Hashable:
        return self._definitions[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._definitions)

    def __len__(self) -> int:
        return len(self._definitions)

    def holds(self, name: str, definition: Hashable, refusal: str) -> bool:
        """
        Whether ``name`` is registered from ``definition`` already (then there is nothing to
        do); False when :meth:`register` may (re)register it.

        Raises:
            ValueError(refusal): other code registered ``name``.
        """
        if name not in DatasetCatalog:
            return False
        if self._definitions.get(name) == definition:
            return True
        if name not in self._definitions:
            raise ValueError(refusal)
        return False

    def register(self, name: str, loader: Callable[[], List[Dict]], metadata: Dict[str, Any],
                 definition: Hashable) -> None:
        """Register ``loader`` and ``metadata`` under ``name``, replacing this registrar's
        earlier entries of that name; call it when :meth:`holds` says False."""
        if name in self._definitions:  # stale: other paths, other classes
            if name in DatasetCatalog:
                DatasetCatalog.remove(name)
            if name in MetadataCatalog:
                MetadataCatalog.remove(name)
        DatasetCatalog.register(name, loader)
        MetadataCatalog.get(name).set(**metadata)
        self._definitions[name] = definition

    def register_once(self, name: str, loader: Callable[[], List[Dict]],
                      metadata: Dict[str, Any], definition: Hashable, refusal: str) -> None:
        """:meth:`register` unless :meth:`holds` (which raises ``refusal`` for a name that other
        code registered)."""
        if not self.holds(name, definition, refusal):
            self.register(name, loader, metadata, definition)
