"""Demo data: an item catalog with topic-bearing text and days of dirty behaviour logs.

Items come from latent topics (vocabulary, category, brands); users hold a Dirichlet taste
over topics, so the text carries real signal about who consumes what. Every kind of dirt
the clean stage handles is planted at a configured rate and counted in the summary.
Pure Python/numpy, deterministic by `DemoConfig.seed`; events are written chunk by chunk.
"""

from __future__ import annotations

import bisect
import datetime as dt
import functools
import json
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmrec_spark.config import DemoConfig, check_demo
from llmrec_spark.errors import ConfigError

log = logging.getLogger(__name__)

DAY_S = 86_400
# Sessions start and end inside the day with this margin, so retries stay on the same day.
DAY_MARGIN_S = 900
CHUNK_EVENTS = 200_000
EPOCH = dt.date(1970, 1, 1)

# Funnel: probability of the next step given the previous one (view -> click -> cart -> purchase).
# Clicks are likelier on topics the user likes.
P_CLICK_BASE, P_CLICK_AFFINITY, P_CART, P_PURCHASE, P_RATING = 0.15, 0.25, 0.3, 0.5, 0.35
UNKNOWN_EVENT_TYPES = ("wishlist", "share", "hover", "VIEWED")
BAD_TIMESTAMPS = ("not-a-time", "2026-13-45T99:61:00Z", "", "yesterday 10pm", "1700000000")
# Share of users who filled in a profile (interests and a short bio).
PROFILE_SHARE = 0.7
GARBAGE_LINES = (
    "ERROR 502 upstream timed out while reading response header",
    "<html><body>Service Unavailable</body></html>",
    "user=u00001 item=i000001 type=view",
    "null",
    "[1, 2, 3]",
)


@dataclass(frozen=True)
class Topic:
    name: str
    category: str
    brands: tuple[str, ...]
    adjectives: tuple[str, ...]
    nouns: tuple[str, ...]
    specs: tuple[str, ...]
    uses: tuple[str, ...]
    features: tuple[str, ...]


# One block per topic: name | category, then its vocabulary, alternatives separated by ' | '.
TOPIC_TABLE = """
hiking | Outdoors
    brands: Summitline | TrailForge | Alpenrock
    adjectives: Lightweight | Waterproof | Breathable | Rugged | Packable | Insulated
    nouns: Trail Backpack | Hiking Boots | Trekking Poles | Rain Shell | Daypack | Hydration Bladder
    specs: 30L | 45L | 2-Pack | Gore-Tex | Carbon
    uses: for long days on the trail | for alpine scrambles | for multi-day treks
    features: Ventilated back panel keeps you cool on steep climbs | Grippy lugged outsole bites into loose scree | Seam-sealed fabric sheds mountain rain
coffee | Kitchen
    brands: BrewHaus | Crema & Co | Roastwell
    adjectives: Single-Origin | Dark Roast | Precision | Barista-Grade | Stainless | Burr
    nouns: Espresso Machine | Pour-Over Kettle | Coffee Grinder | Whole Bean Coffee | French Press | Milk Frother
    specs: 1kg | 250g | 15 Bar | 1.2L | Gooseneck
    uses: for the perfect morning cup | for cafe-quality espresso at home | for slow weekend brewing
    features: Conical burrs give a consistent grind for espresso and filter | Notes of chocolate, cherry and toasted almond | Temperature control holds the water at the ideal extraction point
photography | Electronics
    brands: Lumora | Aperture Labs | Fotonix
    adjectives: Mirrorless | Full-Frame | Stabilized | Wide-Angle | Fast | Compact
    nouns: Camera Body | Prime Lens | Zoom Lens | Camera Tripod | Camera Bag | ND Filter
    specs: 35mm f/1.8 | 24-70mm | 4K | Carbon Fiber | 77mm
    uses: for landscape and street photography | for sharp low-light portraits | for travel vlogging
    features: Fast autofocus tracks eyes and moving subjects | Weather-sealed body handles dust and drizzle | Low-dispersion glass keeps colours crisp to the edges
gaming | Electronics
    brands: PixelForge | Nexon Gear | Voltstrike
    adjectives: RGB | Mechanical | Wireless | Low-Latency | Ergonomic | Pro
    nouns: Gaming Mouse | Mechanical Keyboard | Gaming Headset | Controller | Gaming Chair | Mouse Pad
    specs: 16000 DPI | TKL | 7.1 Surround | XL | Hot-Swap
    uses: for competitive esports | for marathon gaming sessions | for streaming setups
    features: Hot-swappable switches let you tune every keystroke | Sub-millisecond wireless keeps aim precise | Memory foam ear cushions stay comfortable for hours
running | Sports
    brands: Stridewell | Pacewing | Kinetic Run
    adjectives: Cushioned | Responsive | Reflective | Moisture-Wicking | Carbon-Plated | Lightweight
    nouns: Running Shoes | Running Vest | GPS Watch | Compression Socks | Running Shorts | Headlamp
    specs: Men's | Women's | 10K | Marathon | Trail
    uses: for tempo runs and race day | for easy recovery miles | for early morning runs
    features: Foam midsole returns energy with every stride | Accurate GPS tracks pace, distance and heart rate | Breathable mesh upper keeps feet dry
gardening | Home & Garden
    brands: GreenThumb | Verdant | Rootstock
    adjectives: Organic | Heirloom | Ergonomic | Heavy-Duty | Self-Watering | Raised
    nouns: Seed Kit | Pruning Shears | Garden Hose | Planter Box | Compost Bin | Trowel Set
    specs: 50ft | 12-Pack | Cedar | Stainless Steel | Large
    uses: for thriving vegetable beds | for balcony and patio gardens | for year-round herbs
    features: Sharp bypass blades make clean cuts that heal fast | Non-GMO seeds with high germination rates | Reservoir waters roots for up to two weeks
baking | Kitchen
    brands: Flour & Flame | Bakewise | Ovenly
    adjectives: Non-Stick | Professional | Silicone | Cast-Iron | Artisan | Heavy-Gauge
    nouns: Stand Mixer | Bread Proofing Basket | Baking Sheet | Loaf Pan | Dutch Oven | Pastry Set
    specs: 5.5 Qt | 9-inch | Set of 3 | Enamel | Bannetone
    uses: for crusty sourdough loaves | for weekend cakes and cookies | for holiday baking
    features: Even heat gives a golden crust every time | Planetary mixing action kneads heavy doughs | Releases bakes cleanly without greasing
yoga | Sports
    brands: Lotus Flow | Zenspire | Balancia
    adjectives: Non-Slip | Eco-Friendly | Extra-Thick | Foldable | Cork | Supportive
    nouns: Yoga Mat | Yoga Block | Meditation Cushion | Stretch Strap | Yoga Leggings | Foam Roller
    specs: 6mm | 2-Pack | Travel | High-Waist | Organic Cotton
    uses: for daily vinyasa practice | for mindful meditation | for post-run recovery stretches
    features: Grippy natural rubber holds every pose | Dense foam cushions knees and wrists | Sweat-wicking fabric moves with you
audio | Electronics
    brands: Sonique | Bassline | Clarity Audio
    adjectives: Noise-Cancelling | Hi-Fi | Bluetooth | Studio | Portable | Waterproof
    nouns: Headphones | Earbuds | Bookshelf Speakers | Turntable | Soundbar | DAC Amplifier
    specs: Over-Ear | True Wireless | 24-bit | 2.1 Channel | 40h Battery
    uses: for immersive listening | for commuting and travel | for vinyl collectors
    features: Active noise cancelling silences busy trains | Balanced drivers deliver deep bass and clear vocals | Belt-driven platter keeps records spinning true
pets | Pet Supplies
    brands: Happy Paws | Whisker & Tail | Barkley
    adjectives: Chew-Resistant | Orthopedic | Grain-Free | Interactive | Washable | Reflective
    nouns: Dog Bed | Cat Tree | Dog Leash | Puzzle Feeder | Cat Litter | Dog Treats
    specs: Large | Small Breed | 6ft | Salmon Recipe | Multi-Level
    uses: for playful puppies | for curious indoor cats | for senior dogs
    features: Memory foam supports aching joints | Puzzle design slows down fast eaters | Made with real salmon and no fillers
cycling | Sports
    brands: Velocita | Chainline | Roadrunner Bikes
    adjectives: Aero | Tubeless | Clipless | Rechargeable | Carbon | Endurance
    nouns: Road Bike Helmet | Bike Light Set | Cycling Jersey | Bike Pump | Saddle Bag | Clipless Pedals
    specs: 700x28c | 1200 Lumen | Floor | Bib | MIPS
    uses: for long road rides | for commuting after dark | for gravel adventures
    features: MIPS liner adds protection in angled impacts | USB-C rechargeable lights last the whole commute | Chamois pad keeps you comfortable for centuries
skincare | Beauty
    brands: Dermaglow | Pure Bloom | Aqualis
    adjectives: Hydrating | Fragrance-Free | Vitamin C | Gentle | Mineral | Overnight
    nouns: Face Serum | Moisturizer | Sunscreen SPF 50 | Cleanser | Eye Cream | Face Mask
    specs: 30ml | 50ml | Travel Size | Refill | Sensitive Skin
    uses: for a brighter complexion | for dry and sensitive skin | for daily sun protection
    features: Hyaluronic acid locks in moisture all day | Dermatologist tested and non-comedogenic | Antioxidants fade dark spots over time
camping | Outdoors
    brands: Basecamp | Campfire Co | Northwild
    adjectives: Ultralight | Four-Season | Self-Inflating | Windproof | Compact | Double
    nouns: Tent | Sleeping Bag | Camp Stove | Sleeping Pad | Lantern | Cooler
    specs: 2-Person | -10C | Titanium | 45 Qt | Solar
    uses: for family campouts | for backcountry nights | for festival weekends
    features: Sets up in minutes with colour-coded poles | Boils a litre of water in three minutes | Draft collar traps warmth on cold nights
books | Books
    brands: Northlight Press | Inkwell Books | Paperlane
    adjectives: Bestselling | Illustrated | Hardcover | Award-Winning | Collected | Annotated
    nouns: Fantasy Novel | Mystery Thriller | Science Fiction Saga | Cookbook | Biography | Poetry Collection
    specs: Book 1 | Deluxe Edition | Paperback | Box Set | Second Edition
    uses: for fans of epic worlds | for late-night page turning | for curious minds
    features: A sweeping tale of dragons, exile and betrayal | A detective races a killer through a snowbound city | Gorgeous full-colour illustrations on every page
office | Office
    brands: Deskcraft | WorkNest | Paperpoint
    adjectives: Ergonomic | Adjustable | Standing | Dual-Monitor | Minimalist | Recycled
    nouns: Office Chair | Standing Desk | Monitor Arm | Notebook | Desk Lamp | Cable Organizer
    specs: Mesh | Electric | A5 Dotted | Gas Spring | LED
    uses: for long workdays | for a tidy home office | for focused deep work
    features: Lumbar support adjusts to your back | Quiet dual motors lift the desk in seconds | Fountain-pen friendly paper that does not bleed
toys | Toys
    brands: Brickwise | Playnest | Wonderkin
    adjectives: Educational | Wooden | Remote-Control | Magnetic | Plush | STEM
    nouns: Building Set | Puzzle | RC Car | Board Game | Stuffed Animal | Science Kit
    specs: 500 Pieces | Ages 8+ | 1:16 Scale | Family Edition | Glow-in-the-Dark
    uses: for curious young builders | for family game night | for budding scientists
    features: Hundreds of pieces snap together into three models | Hands-on experiments make chemistry fun | Rechargeable battery gives 40 minutes of racing
"""


def _parse_topics(table: str) -> tuple[Topic, ...]:
    """TOPIC_TABLE's blocks as Topic records."""
    topics = []
    for block in re.split(r"\n(?=\S)", table.strip()):
        head, *fields = block.splitlines()
        name, category = (part.strip() for part in head.split("|"))
        vocab = {}
        for line in fields:
            key, _, values = line.strip().partition(":")
            vocab[key] = tuple(v.strip() for v in values.split("|"))
        topics.append(Topic(name, category, **vocab))
    return tuple(topics)


TOPICS = _parse_topics(TOPIC_TABLE)

GENERIC_SENTENCES = (
    "Backed by a two-year warranty.",
    "Ships in recyclable packaging.",
    "A customer favourite for its value for money.",
    "Easy to clean and built to last.",
    "Available in several colours.",
    "Designed and tested by our product team.",
)


DIRT_KINDS = (
    "exact_duplicates",
    "retries",
    "malformed",
    "unknown_items",
    "missing_fields",
    "late",
    "bot_events",
    "unknown_event_types",
    "bad_timestamps",
)
# missing_fields split by the field left out.
MISSING_BREAKDOWN = ("user_missing", "item_missing")


def generate_demo(cfg: DemoConfig, landing_dir: str, end_ds: str) -> dict[str, Any]:
    """Write `catalog/items.jsonl`, `users/profiles.jsonl` and `events/ds=*/part-00000.jsonl`
    for cfg.days days ending at end_ds.

    Returns counts of items, users and events written and of each kind of planted dirt.
    """
    check_demo(cfg)  # a DemoConfig built in code has not been through load_config
    try:
        end = dt.date.fromisoformat(end_ds)
    except ValueError:
        raise ConfigError(f"demo end date {end_ds!r} is not a date in YYYY-MM-DD form") from None
    started = time.perf_counter()
    start = end - dt.timedelta(days=cfg.days - 1)
    world = build_world(cfg, start, end)
    _write_catalog(world, os.path.join(landing_dir, "catalog", "items.jsonl"))
    profiles = _write_user_profiles(
        world, cfg, os.path.join(landing_dir, "users", "profiles.jsonl")
    )

    summary: dict[str, Any] = {
        "items": len(world.items),
        "new_items": cfg.new_items,
        "users": cfg.n_users,
        "user_profiles": profiles,
        "bots": cfg.n_bots,
        "days": cfg.days,
        "first_ds": start.isoformat(),
        "end_ds": end_ds,
    }
    counts = dict.fromkeys((*DIRT_KINDS, *MISSING_BREAKDOWN, "events", "organic"), 0)
    for offset in range(cfg.days):
        day = start + dt.timedelta(days=offset)
        folder = os.path.join(landing_dir, "events", f"ds={day.isoformat()}")
        os.makedirs(folder, exist_ok=True)
        rng = random.Random(_sub_seed(cfg.seed, "events", day.isoformat()))
        with open(os.path.join(folder, "part-00000.jsonl"), "w", encoding="utf-8") as out:
            for lines, day_counts in _day_chunks(world, cfg, day, rng):
                out.write("\n".join(lines) + "\n")
                for key, value in day_counts.items():
                    counts[key] += value
    summary.update(counts)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    log.info(
        "demo: %d items, %d users, %d event lines over %d days in %s (%.1fs)",
        summary["items"],
        cfg.n_users,
        counts["events"],
        cfg.days,
        os.path.join(landing_dir, "events"),
        summary["seconds"],
    )
    return summary


@dataclass
class DemoWorld:
    """The latent structure behind the demo data (kept in memory: items and users only)."""

    items: list[dict[str, str]]
    item_topic: np.ndarray  # (n_items + new_items,)
    topic_items: list[list[str]]  # warm item ids per topic, most popular first
    topic_cum_weights: list[list[float]]  # Zipf popularity within each topic, cumulative
    user_ids: list[str]
    user_cum_activity: list[float]
    user_topic_cum: np.ndarray  # (n_users, n_topics) cumulative Dirichlet taste
    user_taste: np.ndarray  # (n_users, n_topics)
    user_app_share: np.ndarray  # (n_users,)
    bot_ids: list[str]
    warm_item_ids: list[str]
    n_catalog: int


def build_world(cfg: DemoConfig, start: dt.date, end: dt.date) -> DemoWorld:
    """Items with topic text, users with topic tastes and activity levels; no events."""
    rng = np.random.default_rng(_sub_seed(cfg.seed, "world"))
    text_rng = random.Random(_sub_seed(cfg.seed, "text"))
    n_total = cfg.n_items + cfg.new_items
    # Topics have uneven sizes, like real assortments.
    topic_sizes = rng.dirichlet(np.full(cfg.n_topics, 4.0))
    item_topic = rng.choice(cfg.n_topics, size=n_total, p=topic_sizes)
    items = []
    for idx in range(n_total):
        is_new = idx >= cfg.n_items
        added = end if is_new else start - dt.timedelta(days=int(rng.integers(1, 400)))
        items.append(_make_item(idx, int(item_topic[idx]), added, text_rng))

    topic_items: list[list[str]] = [[] for _ in range(cfg.n_topics)]
    for idx in range(cfg.n_items):
        topic_items[int(item_topic[idx])].append(items[idx]["item_id"])
    topic_cum_weights = []
    for k in range(cfg.n_topics):
        if not topic_items[k]:  # tiny catalogs: a topic may get no warm item; borrow one
            topic_items[k].append(items[k % cfg.n_items]["item_id"])
        order = rng.permutation(len(topic_items[k]))
        topic_items[k] = [topic_items[k][i] for i in order]
        weights = 1.0 / np.arange(1, len(topic_items[k]) + 1) ** 1.05
        topic_cum_weights.append(np.cumsum(weights).tolist())

    taste = rng.dirichlet(np.full(cfg.n_topics, 0.25), size=cfg.n_users)
    activity = rng.lognormal(0.0, 1.0, size=cfg.n_users)
    return DemoWorld(
        items=items,
        item_topic=item_topic,
        topic_items=topic_items,
        topic_cum_weights=topic_cum_weights,
        user_ids=[f"u{i:05d}" for i in range(1, cfg.n_users + 1)],
        user_cum_activity=np.cumsum(activity).tolist(),
        user_topic_cum=np.cumsum(taste, axis=1),
        user_taste=taste,
        user_app_share=rng.beta(2.0, 2.0, size=cfg.n_users),
        bot_ids=[f"u{cfg.n_users + 1 + b:05d}" for b in range(cfg.n_bots)],
        warm_item_ids=[it["item_id"] for it in items[: cfg.n_items]],
        n_catalog=n_total,
    )


def _make_item(idx: int, topic_idx: int, added: dt.date, rng: random.Random) -> dict[str, str]:
    topic = TOPICS[topic_idx % len(TOPICS)]
    # More topics than templates: the repeats get their own brands, so they stay distinguishable.
    generation = topic_idx // len(TOPICS)
    brands = (
        topic.brands
        if generation == 0
        else tuple(f"{b} {_roman(generation + 1)}" for b in topic.brands)
    )
    adjective, noun = rng.choice(topic.adjectives), rng.choice(topic.nouns)
    title_parts = [adjective, noun]
    if rng.random() < 0.6:
        title_parts.append(rng.choice(topic.specs))
    sentences = [
        f"{_article(adjective)} {adjective.lower()} {noun.lower()} {rng.choice(topic.uses)}."
    ]
    if rng.random() < 0.7:
        sentences.append(rng.choice(topic.features) + ".")
    if rng.random() < 0.4:
        sentences.append(rng.choice(GENERIC_SENTENCES))
    description = "" if rng.random() < 0.02 else " ".join(sentences)
    return {
        "item_id": f"i{idx + 1:06d}",
        "title": " ".join(title_parts),
        "description": description,
        "category": topic.category,
        "brand": rng.choice(brands),
        "available": "false" if rng.random() < 0.04 else "true",
        "added_ds": added.isoformat(),
    }


def _write_catalog(world: DemoWorld, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for item in world.items:
            out.write(json.dumps(item) + "\n")


def _write_user_profiles(world: DemoWorld, cfg: DemoConfig, path: str) -> int:
    """Self-described interests for a share of the users (their two strongest tastes); returns the count."""
    rng = random.Random(_sub_seed(cfg.seed, "profiles"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    written = 0
    with open(path, "w", encoding="utf-8") as out:
        for user_idx, user_id in enumerate(world.user_ids):
            if rng.random() >= PROFILE_SHARE:
                continue
            favourites = np.argsort(-world.user_taste[user_idx], kind="stable")[:2]
            topics = [TOPICS[int(k) % len(TOPICS)] for k in favourites]
            interests = ", ".join(dict.fromkeys(t.name for t in topics))
            noun = rng.choice(topics[0].nouns).lower()
            bio = f"Shopping for {_article(noun).lower()} {noun} {rng.choice(topics[0].uses)}."
            out.write(json.dumps({"user_id": user_id, "interests": interests, "bio": bio}) + "\n")
            written += 1
    return written


def _day_chunks(
    world: DemoWorld, cfg: DemoConfig, day: dt.date, rng: random.Random
) -> Iterator[tuple[list[str], dict[str, int]]]:
    """One landing day's lines in chunks of about CHUNK_EVENTS, each chunk sorted by arrival."""
    day_start_ms = _epoch_ms(day)
    # Weekly rhythm: weekends are busier; the weekly mean stays events_per_day.
    target = int(cfg.events_per_day * (1.125 if day.weekday() >= 5 else 0.95))
    start_hours = rng.choices(range(24), weights=_HOURLY, k=max(1, target // 2))
    session_starts = sorted(h * 3600 + rng.random() * 3600 for h in start_hours)
    free_at: dict[int, float] = {}
    produced = 0
    pending: list[dict[str, Any]] = []
    for start_s in session_starts:
        if produced >= target:
            break
        session = _session(world, day_start_ms, start_s, free_at, rng)
        pending.extend(session)
        produced += len(session)
        if len(pending) >= CHUNK_EVENTS:
            yield _dirty_chunk(pending, world, cfg, rng)
            pending = []
    yield _dirty_chunk(pending, world, cfg, rng, _bot_events(world, cfg, day_start_ms, rng))


# Share of sessions starting in each UTC hour: quiet nights, busy evenings.
_HOURLY = (1, 1, 1, 1, 1, 2, 3, 4, 5, 5, 5, 6, 6, 5, 5, 5, 6, 7, 9, 10, 9, 7, 4, 2)


def _session(
    world: DemoWorld,
    day_start_ms: int,
    start_s: float,
    free_at: dict[int, float],
    rng: random.Random,
) -> list[dict[str, Any]]:
    """One user's visit: a few viewed items from their favourite topics and funnel steps."""
    user = bisect.bisect_left(world.user_cum_activity, rng.random() * world.user_cum_activity[-1])
    user = min(user, len(world.user_ids) - 1)
    # A user's sessions never overlap, so no organic event looks like a client retry.
    t = max(start_s, free_at.get(user, -1e9) + rng.uniform(60, 600))
    n_views = min(1 + int(rng.expovariate(0.6)), 8)
    if t + n_views * 5 * 120 > DAY_S - DAY_MARGIN_S:  # at most 5 funnel steps of <= 120 s
        return []
    session_id = f"s-{rng.getrandbits(48):012x}"
    source = "app" if rng.random() < world.user_app_share[user] else "web"
    cum = world.user_topic_cum[user]
    seen: set[str] = set()
    events: list[dict[str, Any]] = []
    for _ in range(n_views):
        topic = min(bisect.bisect_left(cum, rng.random() * cum[-1]), len(cum) - 1)
        items, weights = world.topic_items[topic], world.topic_cum_weights[topic]
        item = items[min(bisect.bisect_left(weights, rng.random() * weights[-1]), len(items) - 1)]
        if item in seen:
            continue
        seen.add(item)
        # 0 = no taste for the topic, 1 = four times the average taste or more.
        affinity = min(float(world.user_taste[user, topic]) * len(cum), 4.0) / 4.0
        steps = ["view"]
        if rng.random() < P_CLICK_BASE + P_CLICK_AFFINITY * affinity:
            steps.append("click")
            if rng.random() < P_CART:
                steps.append("cart")
                if rng.random() < P_PURCHASE:
                    steps.append("purchase")
                    if rng.random() < P_RATING:
                        steps.append("rating")
        for step in steps:
            t += rng.uniform(15, 120)
            value = None
            if step == "rating":
                value = float(max(1, min(5, round(2.0 + 3.0 * affinity + rng.gauss(0, 0.8)))))
            events.append(
                {
                    "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                    "user_id": world.user_ids[user],
                    "item_id": item,
                    "event_type": step,
                    "ts_ms": day_start_ms + int(t * 1000),
                    "value": value,
                    "session_id": session_id,
                    "source": source,
                }
            )
    free_at[user] = t
    return events


def _bot_events(
    world: DemoWorld, cfg: DemoConfig, day_start_ms: int, rng: random.Random
) -> list[dict[str, Any]]:
    """Scrapers: evenly spaced views over many distinct items, from one session per bot."""
    events = []
    n = cfg.bot_events_per_day
    for bot in world.bot_ids:
        step_s = (DAY_S - 2 * DAY_MARGIN_S) / max(n, 1)
        session_id = f"s-{rng.getrandbits(48):012x}"
        for k in range(n):
            t = DAY_MARGIN_S + k * step_s + rng.uniform(0, step_s / 4)
            events.append(
                {
                    "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                    "user_id": bot,
                    "item_id": world.warm_item_ids[rng.randrange(len(world.warm_item_ids))],
                    "event_type": "view" if rng.random() < 0.9 else "click",
                    "ts_ms": day_start_ms + int(t * 1000),
                    "value": None,
                    "session_id": session_id,
                    "source": "web",
                }
            )
    return events


def _dirty_chunk(
    organic: list[dict[str, Any]],
    world: DemoWorld,
    cfg: DemoConfig,
    rng: random.Random,
    bot_events: list[dict[str, Any]] | None = None,
) -> tuple[list[str], dict[str, int]]:
    """Plant every kind of dirt into a chunk of organic events; return sorted lines and counts."""
    n = len(organic)
    counts = dict.fromkeys((*DIRT_KINDS, *MISSING_BREAKDOWN), 0)
    counts["organic"] = n
    # Disjoint sets of organic events get mutated; duplicates and retries copy clean ones.
    mutations = [
        ("malformed", cfg.malformed_rate),
        ("unknown_items", cfg.unknown_item_rate),
        ("missing_fields", cfg.missing_field_rate),
        ("unknown_event_types", cfg.unknown_event_type_rate),
        ("bad_timestamps", cfg.bad_timestamp_rate),
        ("late", cfg.late_rate),
    ]
    order = list(range(n))
    rng.shuffle(order)
    pos = 0
    kind_of: dict[int, str] = {}
    for kind, rate in mutations:
        k = _planted(n, rate, rng)
        for idx in order[pos : pos + k]:
            kind_of[idx] = kind
        counts[kind] += len(order[pos : pos + k])
        pos += k
    clean_pool = order[pos:]
    n_dup = min(_planted(n, cfg.exact_duplicate_rate, rng), len(clean_pool))
    n_retry = min(_planted(n, cfg.retry_rate, rng), len(clean_pool) - n_dup)
    dup_idx = clean_pool[:n_dup]
    retry_idx = clean_pool[n_dup : n_dup + n_retry]
    counts["exact_duplicates"] = n_dup
    counts["retries"] = n_retry

    # (arrival ms, line): late events arrive today but happened 1-3 days earlier.
    lines: list[tuple[int, str]] = []
    for idx, event in enumerate(organic):
        arrival = event["ts_ms"]
        mutation = kind_of.get(idx)
        if mutation == "late":
            event = dict(event, ts_ms=event["ts_ms"] - rng.randint(1, 3) * DAY_S * 1000)
        lines.append((arrival, _mutate(event, mutation, world, rng, counts)))
    for idx in dup_idx:
        event = organic[idx]
        lines.append((event["ts_ms"] + rng.randint(0, 600_000), _line(event)))
    for idx in retry_idx:
        event = organic[idx]
        retry = dict(
            event,
            event_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            ts_ms=event["ts_ms"] + rng.randint(1000, 5000),
        )
        lines.append((retry["ts_ms"], _line(retry)))
    for event in bot_events or []:
        lines.append((event["ts_ms"], _line(event)))
    counts["bot_events"] = len(bot_events or [])
    lines.sort(key=lambda pair: pair[0])
    counts["events"] = len(lines)
    return [line for _, line in lines], counts


def _mutate(
    event: dict[str, Any],
    kind: str | None,
    world: DemoWorld,
    rng: random.Random,
    counts: dict[str, int],
) -> str:
    """The JSON line of `event`, broken in the way `kind` says (None: intact)."""
    if kind == "malformed":
        if rng.random() < 0.5:
            text = _line(event)
            return text[: rng.randint(5, len(text) - 2)]  # truncated: never a complete object
        return rng.choice(GARBAGE_LINES)
    if kind == "unknown_items":
        return _line(dict(event, item_id=f"i{world.n_catalog + 1 + rng.randrange(10**5):06d}"))
    if kind == "missing_fields":
        field = rng.choice(("user_id", "item_id"))
        counts[field.replace("_id", "_missing")] += 1
        broken = dict(event)
        if rng.random() < 0.5:
            del broken[field]
        else:
            broken[field] = None
        return _line(broken)
    if kind == "unknown_event_types":
        return _line(dict(event, event_type=rng.choice(UNKNOWN_EVENT_TYPES), value=None))
    if kind == "bad_timestamps":
        return _line(event, ts_text=rng.choice(BAD_TIMESTAMPS))
    return _line(event)


EVENT_KEYS = (
    "event_id",
    "user_id",
    "item_id",
    "event_type",
    "event_ts",
    "value",
    "session_id",
    "source",
)


def _line(event: dict[str, Any], ts_text: str | None = None) -> str:
    """The JSON line of an event; a formatted fast path when every field is present and plain."""
    ts = ts_text if ts_text is not None else _iso(event["ts_ms"])
    if (
        ts_text is None
        and len(event) == len(EVENT_KEYS)
        and all(isinstance(event[k], str) for k in ("event_id", "user_id", "item_id", "event_type"))
    ):
        value = "null" if event["value"] is None else repr(float(event["value"]))
        return (
            f'{{"event_id":"{event["event_id"]}","user_id":"{event["user_id"]}",'
            f'"item_id":"{event["item_id"]}","event_type":"{event["event_type"]}",'
            f'"event_ts":"{ts}","value":{value},"session_id":"{event["session_id"]}",'
            f'"source":"{event["source"]}"}}'
        )
    out = dict(event, event_ts=ts)
    return json.dumps({k: out[k] for k in EVENT_KEYS if k in out}, separators=(",", ":"))


def _planted(n: int, rate: float, rng: random.Random) -> int:
    """How many of n records get a dirt of this rate: the expected count, randomly rounded."""
    expected = n * rate
    whole = int(expected)
    return min(n, whole + (1 if rng.random() < expected - whole else 0))


def _iso(ts_ms: int) -> str:
    """ISO-8601 UTC with milliseconds and 'Z' (strftime is the generator's hot spot, so by hand)."""
    days, ms_of_day = divmod(ts_ms, DAY_S * 1000)
    seconds, ms = divmod(ms_of_day, 1000)
    hours, rest = divmod(seconds, 3600)
    return f"{_date_text(days)}T{hours:02d}:{rest // 60:02d}:{rest % 60:02d}.{ms:03d}Z"


@functools.lru_cache(maxsize=4096)
def _date_text(days_since_epoch: int) -> str:
    return (EPOCH + dt.timedelta(days=days_since_epoch)).isoformat()


def _epoch_ms(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() * 1000)


def _sub_seed(seed: int, *parts: str) -> int:
    """A stable seed per (seed, purpose): Python's hash() is salted per process, so not used."""
    value = seed
    for part in parts:
        for ch in part:
            value = (value * 1_000_003 + ord(ch)) % (2**63)
    return value


def _article(word: str) -> str:
    return "An" if word[0].lower() in "aeiou" else "A"


def _roman(n: int) -> str:
    return {2: "II", 3: "III", 4: "IV", 5: "V"}.get(n, str(n))
