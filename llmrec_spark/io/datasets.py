"""Loaders of public recommendation datasets onto the product's raw event and catalog schemas.

Every loader returns a `Dataset`: `events` in `schema.RAW_EVENT` (ratings become
event_type "rating" with value = the rating, event_ts ISO-8601 text), `rating_scale` (the
layout's valid ratings, for clean.rating_*) and `catalog` in `schema.CATALOG`, the item text (title, genres/categories, description, brand) coming from
the dataset's item side. Supported layouts:

* MovieLens ml-100k: `u.data` (tab-separated) + `u.item` (latin-1, `|`, 19 genre flags),
  optionally `u.user` (latin-1, `|`: user id, age, gender, occupation, zip code)
* MovieLens ml-1m: `ratings.dat` + `movies.dat` (latin-1, `::`), optionally `users.dat`
  (`::`: user id, gender, age code, occupation code, zip code)
* MovieLens ml-latest / ml-latest-small / ml-20m / ml-25m: `ratings.csv` + `movies.csv`
  (no user file)
* Amazon reviews: review JSON lines (reviewerID, asin, overall, unixReviewTime) + metadata
  JSON lines (asin, title, description, categories or category, brand), plain or gzipped

The layout is detected from the files in the folder; none matching is an InputError.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from llmrec_spark.errors import InputError
from llmrec_spark.schema import CATALOG, RAW_EVENT, USER_PROFILE

log = logging.getLogger(__name__)

RATING = "rating"
ML_100K, ML_1M, ML_LATEST, AMAZON = "ml-100k", "ml-1m", "ml-latest", "amazon"
# (ratings file, movies file) per MovieLens layout, in detection order.
MOVIELENS_LAYOUTS = {
    ML_100K: ("u.data", "u.item"),
    ML_1M: ("ratings.dat", "movies.dat"),
    ML_LATEST: ("ratings.csv", "movies.csv"),
}
# u.item's 19 genre flag columns, in file order (as listed in ml-100k's u.genre).
ML_100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
NO_GENRES = "(no genres listed)"
# The optional user file per MovieLens layout (ml-latest has none).
MOVIELENS_USER_FILES = {ML_100K: "u.user", ML_1M: "users.dat"}
# ml-1m's age codes (users.dat) and the band each stands for; ml-100k's ages use the same bands.
ML_1M_AGE_BANDS = {
    "1": "under 18",
    "18": "18-24",
    "25": "25-34",
    "35": "35-44",
    "45": "45-49",
    "50": "50-55",
    "56": "56+",
}
# ml-1m's occupation codes 0-20 (users.dat), as its README lists them.
ML_1M_OCCUPATIONS = (
    "other",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
)
AMAZON_SUFFIXES = (".json", ".json.gz", ".jsonl", ".jsonl.gz")
_LATIN1 = "ISO-8859-1"


@dataclass(frozen=True)
class RatingScale:
    """The ratings a dataset holds: `min` to `max` in steps of `step` (clean.rating_*)."""

    min: float
    max: float
    step: float


# MovieLens latest/20m/25m rate in half stars from 0.5, the older sets and Amazon in whole stars.
RATING_SCALES = {
    ML_100K: RatingScale(1.0, 5.0, 1.0),
    ML_1M: RatingScale(1.0, 5.0, 1.0),
    ML_LATEST: RatingScale(0.5, 5.0, 0.5),
    AMAZON: RatingScale(1.0, 5.0, 1.0),
}


@dataclass(frozen=True)
class Dataset:
    """One public dataset: its layout name, events (RAW_EVENT), item catalog (CATALOG), the
    scale its ratings are on and its user profiles (USER_PROFILE; None without a user file)."""

    layout: str
    events: DataFrame
    catalog: DataFrame
    rating_scale: RatingScale
    profiles: DataFrame | None = None


def load_public_dataset(spark: SparkSession, folder: str) -> Dataset:
    """The dataset in `folder`, whichever supported layout it has; InputError when none matches."""
    layout = folder_layout(folder)
    if layout == AMAZON:
        names = _list_names(folder)
        reviews = [os.path.join(folder, n) for n in sorted(names) if _is_amazon_reviews(n)]
        metadata = [os.path.join(folder, n) for n in sorted(names) if _is_amazon_metadata(n)]
        return load_amazon_reviews(spark, reviews, metadata)
    return load_movielens(spark, folder, layout=layout)


def folder_layout(folder: str) -> str:
    """The layout of the dataset in `folder` ("ml-100k", "amazon", ...) from its file names,
    without Spark; InputError when none matches."""
    names = _list_names(folder)
    layout = detect_layout(names)
    if layout is None:
        raise InputError(
            f"no known dataset layout in {folder}: expected u.data + u.item (ml-100k), "
            "ratings.dat + movies.dat (ml-1m), ratings.csv + movies.csv (ml-latest/ml-25m) "
            "or review + meta*.json files (Amazon); found "
            + (", ".join(sorted(names)[:10]) or "no files")
        )
    return layout


def detect_layout(names: set[str]) -> str | None:
    """The layout whose files are all among `names` (file names of one folder), else None."""
    for layout, required in MOVIELENS_LAYOUTS.items():
        if set(required) <= names:
            return layout
    if any(map(_is_amazon_reviews, names)) and any(map(_is_amazon_metadata, names)):
        return AMAZON
    return None


def load_movielens(spark: SparkSession, folder: str, layout: str | None = None) -> Dataset:
    """A MovieLens folder (layout detected unless given) as events + catalog, plus profiles
    when the folder has the layout's user file."""
    if layout is None:
        layout = detect_layout(_list_names(folder))
    if layout not in MOVIELENS_LAYOUTS:
        expected = "; ".join(f"{' + '.join(f)} ({name})" for name, f in MOVIELENS_LAYOUTS.items())
        raise InputError(f"no MovieLens layout in {folder}: expected {expected}")
    ratings_file, movies_file = (os.path.join(folder, f) for f in MOVIELENS_LAYOUTS[layout])
    if layout == ML_100K:
        ratings = _delimited(
            spark, ratings_file, "\t", "user string, item string, rating double, ts long"
        )
        items = _delimited(
            spark,
            movies_file,
            "|",
            "item string, title string, released string, video_released string, url string, "
            + ", ".join(f"g{k} string" for k in range(len(ML_100K_GENRES))),
            encoding=_LATIN1,
        )
        flags = [
            F.when(F.col(f"g{k}") == "1", F.lit(genre)) for k, genre in enumerate(ML_100K_GENRES)
        ]
        movies = items.select("item", "title", F.concat_ws("|", *flags).alias("genres"))
    elif layout == ML_1M:
        ratings = _delimited(
            spark, ratings_file, "::", "user string, item string, rating double, ts long"
        )
        movies = _delimited(
            spark, movies_file, "::", "item string, title string, genres string", encoding=_LATIN1
        )
    else:
        reader = spark.read.option("header", "true").option("escape", '"')
        ratings = reader.schema("user string, item string, rating double, ts long").csv(
            ratings_file
        )
        movies = reader.schema("item string, title string, genres string").csv(movies_file)
    events = _rating_events(
        ratings,
        source=layout,
        user=F.col("user"),
        item=F.col("item"),
        rating=F.col("rating"),
        epoch_s=F.col("ts"),
    )
    # The files list genres as "Animation|Children's|Comedy"; the encoder reads the category as
    # text, and a comma list is what it has seen in prose (frozen MiniLM's cold-only Recall@20
    # on cold_item validation splits of ml-100k: 0.2698 with pipes, 0.3034 with commas; README).
    listed = F.regexp_replace(F.col("genres"), r"\|", ", ")
    genres = F.when((F.col("genres") != "") & (F.col("genres") != NO_GENRES), listed)
    catalog = _catalog(
        movies.where(F.col("item").isNotNull()),
        item=F.trim("item"),
        title=F.trim("title"),
        category=genres,
        description=F.lit(None),
        brand=F.lit(None),
    )
    profiles = _movielens_profiles(spark, folder, layout)
    log.info("MovieLens %s at %s (user profiles: %s)", layout, folder, profiles is not None)
    return Dataset(layout, events, catalog, RATING_SCALES[layout], profiles)


def load_amazon_reviews(
    spark: SparkSession, reviews: str | list[str], metadata: str | list[str]
) -> Dataset:
    """Amazon-review style JSON lines (plain or .gz) as rating events + catalog.

    Reviews: reviewerID, asin, overall, unixReviewTime. Metadata: asin, title, description
    (text or a list of texts), categories (list of category paths, 2014 files) or category
    (one path, 2018 files), brand. The 2014 files' single-quoted records are accepted.
    """
    review_rows = spark.read.schema(
        "reviewerID string, asin string, overall double, unixReviewTime long"
    ).json(reviews)
    events = _rating_events(
        review_rows,
        source=AMAZON,
        user=F.col("reviewerID"),
        item=F.col("asin"),
        rating=F.col("overall"),
        epoch_s=F.col("unixReviewTime"),
    )
    # Fields whose type differs between dataset versions are read as text and parsed here.
    meta = spark.read.schema(
        "asin string, title string, description string, categories string, category string, "
        "brand string"
    ).json(metadata)
    path = F.coalesce(
        F.element_at(F.from_json("categories", "array<array<string>>"), 1),
        F.from_json("category", "array<string>"),
    )
    description = F.when(
        F.ltrim("description").startswith("["),
        F.concat_ws(" ", F.from_json("description", "array<string>")),
    ).otherwise(F.col("description"))
    catalog = _catalog(
        meta.where(F.col("asin").isNotNull()),
        item=F.trim("asin"),
        title=F.col("title"),
        category=F.when(F.size(path) > 0, F.concat_ws(" > ", path)),
        description=description,
        brand=F.col("brand"),
    )
    return Dataset(AMAZON, events, catalog, RATING_SCALES[AMAZON])


def _rating_events(
    rows: DataFrame, *, source: str, user: Column, item: Column, rating: Column, epoch_s: Column
) -> DataFrame:
    """Ratings in RAW_EVENT: event_id = source:user:item:epoch, event_ts = ISO-8601 text."""
    event_id = F.concat_ws(":", F.lit(source), user, item, epoch_s.cast("string"))
    # XXX prints the offset of the session time zone ("Z" in UTC), so the instant is exact.
    ts_text = F.date_format(F.timestamp_seconds(epoch_s), "yyyy-MM-dd'T'HH:mm:ssXXX")
    columns = {
        "event_id": event_id,
        "user_id": user,
        "item_id": item,
        "event_type": F.lit(RATING),
        "event_ts": ts_text,
        "value": rating,
        "session_id": F.lit(None),
        "source": F.lit(source),
    }
    return rows.select([columns[f.name].cast(f.dataType).alias(f.name) for f in RAW_EVENT.fields])


def _movielens_profiles(spark: SparkSession, folder: str, layout: str) -> DataFrame | None:
    """The folder's user file as USER_PROFILE rows (bio = age band, gender, occupation; no
    interests), or None when the layout has no user file or the folder lacks it."""
    name = MOVIELENS_USER_FILES.get(layout)
    if name is None or name not in _list_names(folder):
        return None
    path = os.path.join(folder, name)
    if layout == ML_100K:
        users = _delimited(
            spark,
            path,
            "|",
            "user string, age int, gender string, occupation string, zip string",
            encoding=_LATIN1,
        )
        age = _age_band(F.col("age"))
        occupation = F.trim("occupation")
    else:
        users = _delimited(
            spark,
            path,
            "::",
            "user string, gender string, age string, occupation string, zip string",
            encoding=_LATIN1,
        )
        age = _code_lookup(F.col("age"), ML_1M_AGE_BANDS)
        codes = {str(code): name for code, name in enumerate(ML_1M_OCCUPATIONS)}
        occupation = _code_lookup(F.col("occupation"), codes)
    gender = F.upper(F.trim("gender"))
    sentences = [
        F.concat(F.lit("Age "), age, F.lit(".")),
        F.when(gender == "M", F.lit("Male.")).when(gender == "F", F.lit("Female.")),
        F.when(
            (occupation != "") & (F.lower(occupation) != "none"),
            F.concat(F.lit("Occupation: "), occupation, F.lit(".")),
        ),
    ]
    # concat_ws skips nulls, so an unknown age, gender or occupation drops its sentence.
    columns = {
        "user_id": F.trim("user"),
        "interests": F.lit(None),
        "bio": F.concat_ws(" ", *sentences),
    }
    return users.where(F.trim("user") != "").select(
        [columns[f.name].cast(f.dataType).alias(f.name) for f in USER_PROFILE.fields]
    )


def _age_band(age: Column) -> Column:
    """ml-1m's age band ("under 18", "18-24", ..., "56+") of an age in years; null for null."""
    bands = [(18, "under 18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49")]
    band = F.when(age < 56, F.lit("50-55")).when(age >= 56, F.lit("56+"))
    for upper, label in reversed(bands):
        band = F.when(age < upper, F.lit(label)).otherwise(band)
    return band


def _code_lookup(code: Column, names: dict[str, str]) -> Column:
    """The name of a (trimmed) code in `names`; null for an unknown or null code."""
    mapping = F.create_map(*[F.lit(x) for pair in names.items() for x in pair])
    return mapping[F.trim(code)]


def _catalog(
    rows: DataFrame,
    *,
    item: Column,
    title: Column,
    category: Column,
    description: Column,
    brand: Column,
) -> DataFrame:
    columns = {
        "item_id": item,
        "title": title,
        "description": description,
        "category": category,
        "brand": brand,
        "available": F.lit("true"),
        "added_ds": F.lit(None),
    }
    return rows.select([columns[f.name].cast(f.dataType).alias(f.name) for f in CATALOG.fields])


def _delimited(
    spark: SparkSession, path: str, sep: str, schema: str, encoding: str = "UTF-8"
) -> DataFrame:
    """A header-less delimited file; quoting off (MovieLens titles hold bare quotes)."""
    return (
        spark.read.schema(schema)
        .option("sep", sep)
        .option("quote", "")
        .option("encoding", encoding)
        .option("mode", "PERMISSIVE")
        .csv(path)
    )


def _is_amazon_metadata(name: str) -> bool:
    return name.startswith("meta") and name.endswith(AMAZON_SUFFIXES)


def _is_amazon_reviews(name: str) -> bool:
    return not name.startswith("meta") and name.endswith(AMAZON_SUFFIXES)


def _list_names(folder: str) -> set[str]:
    """File names directly in `folder` (local path or any pyarrow-supported URI)."""
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(folder if "://" in folder else os.path.abspath(folder))
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=False))
    except (FileNotFoundError, OSError, ValueError):
        raise InputError(f"no dataset folder at {folder}") from None
    return {os.path.basename(i.path) for i in infos if i.type == pafs.FileType.File}
