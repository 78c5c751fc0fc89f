"""Public-dataset loaders: MovieLens (three layouts) and Amazon reviews onto RAW_EVENT + CATALOG,
and MovieLens user files onto USER_PROFILE."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

from llmrec_spark.bench.quality import land, quality_config
from llmrec_spark.errors import InputError
from llmrec_spark.io.datasets import (
    RatingScale,
    detect_layout,
    load_amazon_reviews,
    load_movielens,
    load_public_dataset,
)
from llmrec_spark.io.sources import records_to_lines
from llmrec_spark.schema import CATALOG, RAW_EVENT, USER_PROFILE
from llmrec_spark.stages.clean import clean_events
from llmrec_spark.stages.embed import read_user_profiles, template_text

pytestmark = pytest.mark.spark
WHOLE_STARS, HALF_STARS = RatingScale(1.0, 5.0, 1.0), RatingScale(0.5, 5.0, 0.5)
ML_100K_SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "ml-100k"


def write(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def rating(layout, user, item, epoch, iso, value):
    return (f"{layout}:{user}:{item}:{epoch}", user, item, "rating", iso, value, None, layout)


def item(item_id, title, category, description=None, brand=None):
    return (item_id, title, description, category, brand, "true", None)


def profile(user_id, bio):
    return (user_id, None, bio)


ML_100K_MINIMAL = {
    "u.data": b"196\t242\t3\t881250949\n",
    "u.item": b"242|Kolya (1996)|24-Jan-1997||x|" + b"|".join([b"0"] * 19) + b"\n",
}


def test_layout_detection_from_file_names():
    assert detect_layout({"u.data", "u.item", "u.genre", "README"}) == "ml-100k"
    assert detect_layout({"ratings.dat", "movies.dat", "users.dat"}) == "ml-1m"
    assert detect_layout({"ratings.csv", "movies.csv", "tags.csv", "links.csv"}) == "ml-latest"
    assert detect_layout({"Books_5.json.gz", "meta_Books.json.gz"}) == "amazon"
    assert detect_layout({"ratings.csv", "u.item"}) is None
    assert detect_layout({"meta_Books.json"}) is None


def test_ml_100k_layout(spark, tmp_path):
    flags_toy = "0|0|0|1|1|1|" + "|".join(["0"] * 13)  # Animation, Children's, Comedy
    flags_fever = "0|0|0|0|0|1|0|0|1|" + "|".join(["0"] * 10)  # Comedy, Drama
    flags_none = "|".join(["0"] * 19)
    folder = write(
        tmp_path / "ml-100k",
        {
            "u.data": b"196\t242\t3\t881250949\n186\t302\t4\t891717742\n",
            "u.item": (
                f"1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy|{flags_toy}\n"
                f"1300|\u00c1 k\u00f6ldum klaka (Cold Fever) (1994)|08-Mar-1996||x|{flags_fever}\n"
                f'267|"unknown"|||x|{flags_none}\n'
            ).encode("latin-1"),
        },
    )
    data = load_public_dataset(spark, str(folder))
    assert (data.layout, data.rating_scale) == ("ml-100k", WHOLE_STARS)
    expected_events = [
        rating("ml-100k", "196", "242", 881250949, "1997-12-04T15:55:49Z", 3.0),
        rating("ml-100k", "186", "302", 891717742, "1998-04-04T19:22:22Z", 4.0),
    ]
    assertDataFrameEqual(data.events, spark.createDataFrame(expected_events, RAW_EVENT))
    expected_items = [
        item("1", "Toy Story (1995)", "Animation, Children's, Comedy"),
        item("1300", "\u00c1 k\u00f6ldum klaka (Cold Fever) (1994)", "Comedy, Drama"),
        item("267", '"unknown"', None),
    ]
    assertDataFrameEqual(data.catalog, spark.createDataFrame(expected_items, CATALOG))


def test_ml_1m_layout(spark, tmp_path):
    folder = write(
        tmp_path / "ml-1m",
        {
            "ratings.dat": b"1::1193::5::978300760\n6040::999::2::964982703\n",
            "movies.dat": (
                "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
                "999::Les Mis\u00e9rables (1995)::Drama|War\n"
            ).encode("latin-1"),
            "users.dat": b"1::F::1::10::48067\n",
        },
    )
    data = load_movielens(spark, str(folder))
    assert (data.layout, data.rating_scale) == ("ml-1m", WHOLE_STARS)
    expected_events = [
        rating("ml-1m", "1", "1193", 978300760, "2000-12-31T22:12:40Z", 5.0),
        rating("ml-1m", "6040", "999", 964982703, "2000-07-30T18:45:03Z", 2.0),
    ]
    assertDataFrameEqual(data.events, spark.createDataFrame(expected_events, RAW_EVENT))
    expected_items = [
        item("1193", "One Flew Over the Cuckoo's Nest (1975)", "Drama"),
        item("999", "Les Mis\u00e9rables (1995)", "Drama, War"),
    ]
    assertDataFrameEqual(data.catalog, spark.createDataFrame(expected_items, CATALOG))


def test_ml_100k_user_file_renders_profiles(spark, tmp_path):
    users = (
        "1|24|M|technician|85711\n"
        "2|53|F|other|94043\n"
        "3|17|M|student|32067\n"
        "4|18|F|none|43537\n"
        "5|25|X|writer|15213\n"
        "6|56|M||98101\n"
        "7|55|F|\u00e9crivain|T8H1N\n"  # latin-1 text, as u.item
        " 8 |45|M|educator|01002\n"
    )
    files = {**ML_100K_MINIMAL, "u.user": users.encode("latin-1")}
    data = load_public_dataset(spark, str(write(tmp_path / "ml-100k", files)))
    expected = [
        profile("1", "Age 18-24. Male. Occupation: technician."),
        profile("2", "Age 50-55. Female. Occupation: other."),
        profile("3", "Age under 18. Male. Occupation: student."),
        profile("4", "Age 18-24. Female."),
        profile("5", "Age 25-34. Occupation: writer."),
        profile("6", "Age 56+. Male."),
        profile("7", "Age 50-55. Female. Occupation: \u00e9crivain."),
        profile("8", "Age 45-49. Male. Occupation: educator."),
    ]
    assert data.profiles is not None
    assertDataFrameEqual(data.profiles, spark.createDataFrame(expected, USER_PROFILE))


def test_ml_1m_users_file_renders_coded_ages_and_occupations(spark, tmp_path):
    folder = write(
        tmp_path / "ml-1m",
        {
            "ratings.dat": b"1::1193::5::978300760\n",
            "movies.dat": b"1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n",
            "users.dat": (
                b"1::F::1::10::48067\n"
                b"2::M::56::16::70072\n"
                b"3::M::25::15::55117\n"
                b"4::M::45::7::02460\n"
                b"5::M::18::0::55455\n"
                b"6::F::50::20::55117\n"
                b"7::M::35::1::06810\n"
                b"8::F::99::21::11413\n"  # codes outside the README's lists
            ),
        },
    )
    data = load_movielens(spark, str(folder))
    expected = [
        profile("1", "Age under 18. Female. Occupation: K-12 student."),
        profile("2", "Age 56+. Male. Occupation: self-employed."),
        profile("3", "Age 25-34. Male. Occupation: scientist."),
        profile("4", "Age 45-49. Male. Occupation: executive/managerial."),
        profile("5", "Age 18-24. Male. Occupation: other."),
        profile("6", "Age 50-55. Female. Occupation: writer."),
        profile("7", "Age 35-44. Male. Occupation: academic/educator."),
        profile("8", "Female."),
    ]
    assert data.profiles is not None
    assertDataFrameEqual(data.profiles, spark.createDataFrame(expected, USER_PROFILE))


def test_no_user_file_gives_no_profiles(spark, tmp_path):
    ml_100k = load_public_dataset(spark, str(write(tmp_path / "ml-100k", ML_100K_MINIMAL)))
    ml_1m = write(
        tmp_path / "ml-1m",
        {"ratings.dat": b"1::1193::5::978300760\n", "movies.dat": b"1193::Heat (1995)::Action\n"},
    )
    ml_latest = write(
        tmp_path / "ml-latest-small",
        {
            "ratings.csv": b"userId,movieId,rating,timestamp\n1,1,4.0,964982703\n",
            "movies.csv": b"movieId,title,genres\n1,Toy Story (1995),Comedy\n",
            "users.dat": b"1::F::1::10::48067\n",  # not ml-latest's file: ignored
        },
    )
    assert ml_100k.profiles is None
    assert load_movielens(spark, str(ml_1m)).profiles is None
    assert load_public_dataset(spark, str(ml_latest)).profiles is None


def test_landed_profiles_read_back_as_embed_user_texts(spark, tmp_path, cfg):
    files = {
        "u.data": b"196\t242\t3\t881250949\n186\t242\t4\t891717742\n",
        "u.item": ML_100K_MINIMAL["u.item"],
        "u.user": b"196|49|M|writer|55105\n186|39|F|executive|00000\n",
    }
    data = load_public_dataset(spark, str(write(tmp_path / "ml-100k", files)))
    bench = quality_config(cfg, str(tmp_path / "bench"), span_days=1, ratings=data.rating_scale)
    land(bench, data, "1998-04-05")
    landing = bench.path(bench.storage.landing)
    raw = read_user_profiles(spark, str(Path(landing) / bench.embed.user_profiles))
    assert raw is not None
    texts = template_text(
        raw, template=bench.embed.user_text_template, max_chars=bench.embed.max_text_chars
    )
    # A null `interests` drops out with its separator: the text is the bio alone.
    assert sorted((r["user_id"], r["text"]) for r in texts.collect()) == [
        ("186", "Age 35-44. Female. Occupation: executive."),
        ("196", "Age 45-49. Male. Occupation: writer."),
    ]
    event_users = {r["user_id"] for r in data.events.select("user_id").collect()}
    assert {r["user_id"] for r in raw.collect()} == event_users


def test_ml_latest_layout(spark, tmp_path):
    folder = write(
        tmp_path / "ml-latest-small",
        {
            "ratings.csv": b"userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,11,3.5,964981247\n",
            "movies.csv": (
                b"movieId,title,genres\n"
                b"1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
                b'11,"American President, The (1995)",Comedy|Drama|Romance\n'
                b'182715,"Mind of a Chef, The ""Live"" (2012)",(no genres listed)\n'
            ),
        },
    )
    data = load_public_dataset(spark, str(folder))
    assert (data.layout, data.rating_scale) == ("ml-latest", HALF_STARS)
    expected_events = [
        rating("ml-latest", "1", "1", 964982703, "2000-07-30T18:45:03Z", 4.0),
        rating("ml-latest", "1", "11", 964981247, "2000-07-30T18:20:47Z", 3.5),
    ]
    assertDataFrameEqual(data.events, spark.createDataFrame(expected_events, RAW_EVENT))
    expected_items = [
        item("1", "Toy Story (1995)", "Adventure, Animation, Children, Comedy, Fantasy"),
        item("11", "American President, The (1995)", "Comedy, Drama, Romance"),
        item("182715", 'Mind of a Chef, The "Live" (2012)', None),
    ]
    assertDataFrameEqual(data.catalog, spark.createDataFrame(expected_items, CATALOG))


def test_amazon_reviews_and_metadata(spark, tmp_path):
    import gzip

    folder = write(
        tmp_path / "amazon",
        {
            "Books_5.json": (
                b'{"reviewerID": "A2SUAM1J3GNN3B", "asin": "0000013714", "reviewerName": "J. M",'
                b' "overall": 5.0, "unixReviewTime": 1252800000, "reviewTime": "09 13, 2009"}\n'
                b'{"reviewerID": "AZZ", "asin": "B0001", "overall": 2.0, "unixReviewTime": 1400000000}\n'
            ),
            # 2014 metadata: Python-literal records with category paths.
            "meta_Books.json.gz": gzip.compress(
                b"{'asin': '0000013714', 'title': 'Heavenly Highway Hymns', "
                b"'categories': [['Books', 'Christian Books'], ['Music']], 'brand': 'Shaped Note'}\n"
            ),
            # 2018 metadata: a list description and one category path.
            "meta_Home.json": (
                b'{"asin": "B0001", "title": "Kettle", "description": ["Boils water.", "Fast."],'
                b' "category": ["Home", "Kitchen"], "brand": "Acme"}\n'
                b'{"asin": "B0002", "title": "Mug", "description": "Holds tea."}\n'
            ),
        },
    )
    data = load_public_dataset(spark, str(folder))
    assert (data.layout, data.rating_scale) == ("amazon", WHOLE_STARS)
    expected_events = [
        rating("amazon", "A2SUAM1J3GNN3B", "0000013714", 1252800000, "2009-09-13T00:00:00Z", 5.0),
        rating("amazon", "AZZ", "B0001", 1400000000, "2014-05-13T16:53:20Z", 2.0),
    ]
    assertDataFrameEqual(data.events, spark.createDataFrame(expected_events, RAW_EVENT))
    expected_items = [
        item(
            "0000013714", "Heavenly Highway Hymns", "Books > Christian Books", brand="Shaped Note"
        ),
        item("B0001", "Kettle", "Home > Kitchen", "Boils water. Fast.", "Acme"),
        item("B0002", "Mug", None, "Holds tea."),
    ]
    assertDataFrameEqual(data.catalog, spark.createDataFrame(expected_items, CATALOG))
    # The same files by explicit paths.
    direct = load_amazon_reviews(
        spark, str(folder / "Books_5.json"), [str(folder / "meta_Home.json")]
    )
    assert [r["item_id"] for r in direct.catalog.orderBy("item_id").collect()] == ["B0001", "B0002"]


def test_half_star_ratings_clean_on_the_datasets_scale(spark, tmp_path, cfg):
    folder = write(
        tmp_path / "ml-latest-small",
        {
            "ratings.csv": (
                b"userId,movieId,rating,timestamp\n"
                b"1,1,0.5,964982703\n1,11,4.5,964981247\n2,1,0.25,964982704\n2,11,5.5,964982705\n"
            ),
            "movies.csv": b"movieId,title,genres\n1,Toy Story (1995),Comedy\n11,Heat (1995),Action\n",
        },
    )
    data = load_public_dataset(spark, str(folder))
    assert data.rating_scale == HALF_STARS
    # As `bench quality` lands the dataset: Parquet records, read back as JSON lines.
    lines = records_to_lines(data.events.withColumn("_source_file", F.lit("part-0.parquet")))

    def outcomes(clean_cfg):
        rows = clean_events(
            lines, ds="2000-07-31", known_items=data.catalog, prior=None, cfg=clean_cfg
        ).collect()
        return sorted(
            (r["user_id"], r["item_id"], r["outcome"], r["reasons"], r["weight"]) for r in rows
        )

    bench = quality_config(cfg, str(tmp_path / "bench"), span_days=1, ratings=data.rating_scale)
    assert outcomes(bench.clean) == [
        ("1", "1", "clean", [], 0.5),
        ("1", "11", "clean", [], 4.5),
        ("2", "1", "quarantined", ["bad_rating"], None),
        ("2", "11", "quarantined", ["bad_rating"], None),
    ]
    # The product's default scale (1 to 5) would quarantine the half star.
    assert outcomes(cfg.clean)[0] == ("1", "1", "quarantined", ["bad_rating"], None)


def test_amazon_repeat_reviews_clean_as_exact_duplicates_within_their_day(spark, tmp_path, cfg):
    day = 1_699_920_000  # 2023-11-14T00:00:00Z; unixReviewTime is a whole day

    def review(user, asin, stars, ts):
        return (
            f'{{"reviewerID": "{user}", "asin": "{asin}", "overall": {stars}, '
            f'"unixReviewTime": {ts}}}\n'
        ).encode()

    folder = write(
        tmp_path / "amazon",
        {
            "Toys_5.json": review("U", "B1", 5.0, day)
            + review("V", "B1", 3.0, day)  # another user, the same day: no duplicate
            + review("U", "B2", 4.0, day)  # another item, the same second: no duplicate
            + review("U", "B1", 5.0, day)  # the same line again
            + review("U", "B1", 2.0, day)  # the same day, other stars
            + review("U", "B1", 1.0, day + 3 * 86_400),  # three days on
            "meta_Toys.json": b'{"asin": "B1", "title": "Kite"}\n{"asin": "B2", "title": "Doll"}\n',
        },
    )
    data = load_public_dataset(spark, str(folder))
    lines = records_to_lines(data.events.withColumn("_source_file", F.lit("part-0.parquet")))
    bench = quality_config(cfg, str(tmp_path / "bench"), span_days=4, ratings=data.rating_scale)
    rows = clean_events(
        lines, ds="2023-11-18", known_items=data.catalog, prior=None, cfg=bench.clean
    ).collect()
    outcomes = sorted(
        (r["user_id"], r["item_id"], r["value"], r["outcome"], r["duplicate"]) for r in rows
    )
    # One event_id per (user, item, day): a same-day repeat is an exact duplicate and the first
    # line's stars stand; a re-rating days later is an event of its own (the near-duplicate
    # window is seconds), so both ratings stay clean.
    assert outcomes == [
        ("U", "B1", 1.0, "clean", None),
        ("U", "B1", 2.0, "duplicate", "exact"),
        ("U", "B1", 5.0, "clean", None),
        ("U", "B1", 5.0, "duplicate", "exact"),
        ("U", "B2", 4.0, "clean", None),
        ("V", "B1", 3.0, "clean", None),
    ]


def test_a_folder_of_no_known_layout_is_an_input_error(spark, tmp_path):
    folder = write(tmp_path / "other", {"notes.txt": b"x", "ratings.csv": b"a,b\n"})
    with pytest.raises(InputError, match=r"no known dataset layout in .*other: .*found notes.txt"):
        load_public_dataset(spark, str(folder))
    with pytest.raises(InputError, match="no MovieLens layout in"):
        load_movielens(spark, str(folder))
    with pytest.raises(InputError, match="no dataset folder at"):
        load_public_dataset(spark, str(tmp_path / "missing"))


@pytest.mark.skipif(not (ML_100K_SHARED / "u.data").exists(), reason="no shared ml-100k copy")
def test_movielens_100k_shared_copy(spark):
    from pyspark.sql import functions as F

    data = load_movielens(spark, str(ML_100K_SHARED))
    stats = data.events.agg(
        F.count(F.lit(1)).alias("n"),
        F.countDistinct("user_id").alias("users"),
        F.countDistinct("item_id").alias("items"),
        F.min("value").alias("lo"),
        F.max("value").alias("hi"),
        F.sum(F.col("event_ts").isNull().cast("int")).alias("no_ts"),
    ).first()
    assert (stats["n"], stats["users"], stats["items"]) == (100_000, 943, 1682)
    assert (stats["lo"], stats["hi"], stats["no_ts"]) == (1.0, 5.0, 0)
    first = data.catalog.where("item_id = '1'").first()
    assert (first["title"], first["category"]) == (
        "Toy Story (1995)",
        "Animation, Children's, Comedy",
    )
    assert data.catalog.count() == 1682
