"""Seeded synthetic county exports with ground truth.

Used by the tests, the demo and the benchmarks. ``generate_federation`` builds a small world of
families (households of 1-2 adults and 1-5 children), lets each family be known to one or more
neighbouring counties over the years, and writes one export per county in the canonical county
record shape (see ``schemas/county_record.schema.json``), each copy corrupted the way real case
management systems corrupt records: typos, nicknames, surname changes, swapped day and month,
missing and mistyped NHS numbers, diacritics kept or folded, county-specific codes and formats.
The ground truth (which record is which person and family) comes back alongside.

Everything is vectorised with numpy over people, stays (a family's time in one county) and
records; per-record Python runs only on the few records a corruption touches, so a million records
take seconds. The output depends only on the arguments: the reference date is fixed and every
random draw comes from a ``numpy.random.SeedSequence`` built from ``seed``.

The data are invented. Name lists are everyday UK names with made-up frequencies; postcodes have
plausible outward codes for each county and random inward codes; NHS numbers are random valid
mod-11 numbers.
"""

from __future__ import annotations

import datetime as dt
import functools
import random
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from linkage.records import CANONICAL_COLUMNS

__all__ = [
    "DEFAULT_COUNTIES",
    "SyntheticFederation",
    "generate_federation",
    "true_pairs",
    "write_federation",
]

_IntArray = npt.NDArray[np.int64]
_BoolArray = npt.NDArray[np.bool_]
_ObjArray = npt.NDArray[np.object_]

# The canonical county record, in the order of DESIGN.md's contract.
_COLUMNS: tuple[str, ...] = CANONICAL_COLUMNS

# Ages are computed against a fixed date rather than today so that a seed gives the same data
# whatever day it runs.
_REFERENCE_DATE = np.datetime64("2025-04-01", "D")
_REFERENCE_DAY = str(_REFERENCE_DATE)
_YEAR = 365.25

# --- Probabilities of the world and of each corruption (per record unless noted). ---
_P_TWO_ADULTS = 0.55  # per family
_CHILDREN_P = (0.35, 0.33, 0.18, 0.09, 0.05)  # 1..5 children
_COUNTIES_P = (0.58, 0.34, 0.065, 0.015)  # a family is known to 1..4 counties
_P_TWINS = 0.02  # per family
_P_SIMILAR_TWIN_NAMES = 0.25  # per twin pair: "Aidan"/"Aiden" rather than unrelated names
_P_DOUBLE_BARRELLED = 0.06  # per family: surname "Smith-Jones"
_P_SURNAME_CHANGE = 0.15  # per multi-county family: a new partner after the first move
_P_PREVIOUS_NAME_RECORDED = 0.5  # per stay: the old surname is kept in previous_family_names
_P_PRIMARY_KEEPS_OWN_NAME = 0.3  # per family: the primary carer kept a surname of her own
_P_MAIDEN_NAME_RECORDED = 0.35
_P_MIDDLE = 0.55  # per person: has a middle name
_P_TWO_MIDDLE = 0.12  # per person with a middle name: has two
_P_PRESENT = 0.93  # a member of a family known to a county is on that county's system
_P_NICKNAME = 0.12  # only for given names that have a short form
_P_GIVEN_TYPO = 0.03
_P_MIDDLE_TYPO = 0.01
_P_FAMILY_TYPO = 0.03
_P_DOB_SWAP = 0.02  # only when day <= 12 and day != month
_P_DOB_TYPO = 0.015
_P_DOB_MISSING = 0.008
_P_GIVEN_MISSING = 0.004
_P_NHS_TYPO = 0.02  # of NHS numbers present
_P_SEX_MISSING = 0.01
_P_POSTCODE_MISSING = 0.02
_P_ADDRESS_MISSING = 0.02
_P_POSTCODE_ODD_FORMAT = 0.05  # a record whose postcode is not in the county's usual format
_P_FLAT = 0.1  # per stay: "Flat 3, 12 Station Road"


# --- Counties: id -> (short code used in identifiers, outward postcodes). Listed in a rough ring
# of neighbours, so that moves go mostly to the next county along. ---
def _outward(area: str, *numbers: int) -> tuple[str, ...]:
    return tuple(f"{area}{n}" for n in numbers)


_COUNTY_TABLE: dict[str, tuple[str, tuple[str, ...]]] = {
    "coventry": ("COV", _outward("CV", 1, 2, 3, 4, 5, 6)),
    "warwickshire": (
        "WAR",
        _outward("CV", 8, 10, 11, 12, 21, 22, 23, 31, 32, 34, 35, 37) + _outward("B", 49, 50, 80),
    ),
    "leicestershire": (
        "LEI",
        _outward("LE", *range(1, 20)) + _outward("LE", 65, 67),
    ),
    "northamptonshire": ("NTH", _outward("NN", *range(1, 19)) + _outward("NN", 29)),
    "solihull": ("SOL", _outward("B", 36, 37, 90, 91, 92, 93, 94) + _outward("CV", 7)),
    "staffordshire": (
        "STA",
        _outward("ST", *range(1, 22)) + _outward("WS", *range(7, 16)) + _outward("B", 77, 78, 79),
    ),
    "birmingham": ("BHM", _outward("B", *range(1, 49))),
    "worcestershire": (
        "WOR",
        _outward("WR", *range(1, 16)) + _outward("B", 60, 61, 96, 97, 98),
    ),
    "herefordshire": ("HEF", _outward("HR", *range(1, 10))),
    "shropshire": ("SHR", _outward("SY", *range(1, 14)) + _outward("TF", 9, 11, 12, 13)),
    "telford_and_wrekin": ("TFW", _outward("TF", 1, 2, 3, 4, 5, 6, 7, 8, 10)),
    "derbyshire": (
        "DBY",
        _outward("DE", 1, 3, 4, 5, 6, 7, 11, 12, 21, 22, 23, 24, 45, 55, 56, 75)
        + _outward("S", 40, 41, 42, 43, 44, 45),
    ),
    "nottinghamshire": ("NOT", _outward("NG", *range(1, 26))),
    "lincolnshire": (
        "LIN",
        _outward("LN", *range(1, 14)) + _outward("PE", 10, 11, 12, 20, 21, 22, 23, 24, 25),
    ),
    "rutland": ("RUT", _outward("LE", 15) + _outward("PE", 9)),
    "gloucestershire": ("GLS", _outward("GL", *range(1, 21)) + _outward("GL", *range(50, 57))),
    "oxfordshire": ("OXF", _outward("OX", *range(1, 19)) + _outward("OX", 20, 25, 26, 27, 28)),
}

DEFAULT_COUNTIES: tuple[str, ...] = tuple(_COUNTY_TABLE)
"""County ids, lowercase ``[a-z_]``; ``generate_federation(counties=n)`` uses the first ``n``."""


# --- Names. Each list is in rough order of popularity; sampling is Zipf-like over that order. ---
def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_MALE_NAMES = _words(
    """
    Muhammad Oliver George Noah Arthur Harry Leo Jack Charlie Oscar Jacob Henry Thomas Freddie
    Alfie Theo William Theodore Archie Joshua Alexander James Isaac Edward Lucas Tommy Finley Max
    Logan Ethan Mohammed Teddy Benjamin Arlo Joseph Sebastian Harrison Elijah Adam Daniel Samuel
    Louie Mason Reuben Albie Rory Jaxon Hugo Luca Zachary Reggie Hunter Louis Dylan Albert David
    Jude Frankie Roman Ezra Toby Riley Carter Ronnie Frederick Gabriel Stanley Bobby Jesse
    Michael Elliot Mohammad Ibrahim Yusuf Hamza Omar Ali Zain Ayaan Aarav Arjun Rohan Ravi
    Christopher Andrew Mark Paul Richard Robert Stephen Steven Anthony Jonathan Nicholas Simon
    Darren Lee Craig Wayne Gary Dean Scott Jason Martin Kevin Peter Ian Neil Carl Shaun Stuart
    Matthew Nathan Connor Kyle Jordan Callum Ryan Aaron Jamie Liam Kieran Declan Owen Rhys
    Gareth Dafydd Gethin Seán Ciarán Pádraig Oisín Eoin Cian Bilal Amir Sanjay Rajesh Vikram
    Harpreet Gurpreet Jaskaran Kuldeep Oluwaseun Oluwatobi Adebayo Tunde Chidi Chinedu Emeka
    Kwame Kofi Yaw Abdullahi Abdirahman Abdi Mohamed Łukasz Jakub Kacper Wojciech Szymon Filip
    Mateusz Piotr Tomasz Krzysztof Andrei Mihai Bogdan José Mateo Diego Jérôme Øyvind Björn
    Søren Stefan Dominik Marek Wei Jun Hao Tyrone Delroy Marlon Jermaine Kareem Andre Leon
    Nathaniel Alfred Archibald Ellis Harvey Jayden Caleb Tobias Felix Ralph Jasper Otis Kai
    """
)
_FEMALE_NAMES = _words(
    """
    Olivia Amelia Isla Ava Ivy Freya Lily Florence Mia Willow Rosie Sophia Isabella Grace Daisy
    Sienna Poppy Elsie Emily Ella Evelyn Phoebe Sofia Evie Charlotte Harper Millie Matilda Maya
    Sophie Alice Emilia Isabelle Ruby Luna Maisie Aria Penelope Mila Bonnie Eva Hallie Eliza Ada
    Violet Esme Arabella Imogen Jessica Delilah Aisha Fatima Zainab Maryam Amina Khadija Hafsa
    Ayesha Noor Sana Chloé Zoë Renée Siân Anaïs Noémie Hélène Élodie Sarah Laura Emma Claire
    Rebecca Gemma Kelly Nicola Hayley Leanne Stacey Samantha Natalie Victoria Lisa Michelle Donna
    Joanne Karen Tracy Julie Deborah Susan Elizabeth Katherine Catherine Margaret Jennifer Louise
    Rachel Amy Hannah Lauren Chelsea Jade Danielle Kirsty Charlene Shannon Courtney Abigail
    Alexandra Jacqueline Kimberley Christine Patricia Zara Leah Eleanor Megan Holly Bethany Niamh
    Aoife Siobhán Róisín Caoimhe Saoirse Cerys Seren Ffion Carys Bethan Nia Priya Anjali Sunita
    Pooja Simran Jaspreet Manpreet Nadia Yasmin Safiya Inaya Anaya Mariam Hodan Hawa Amara
    Chiamaka Ngozi Abena Folake Olufunmilayo Adaeze Chioma Temitope Precious Blessing Małgorzata
    Zofia Agnieszka Katarzyna Aleksandra Ioana Maria Ana Mei Jing Xin Gabriella Jasmine Layla
    Harriet Francesca Georgia Molly Erin Lucy Keira Tia Paige Kayleigh
    """
)
_FAMILY_NAMES = _words(
    """
    Smith Jones Williams Taylor Brown Davies Evans Wilson Thomas Johnson Roberts Robinson
    Thompson Wright Walker White Edwards Hughes Green Hall Lewis Harris Clarke Patel Jackson Wood
    Turner Martin Cooper Hill Ward Morris Moore Clark Lee King Baker Harrison Morgan Allen James
    Scott Phillips Watson Davis Parker Price Bennett Young Griffiths Mitchell Kelly Cook Carter
    Richardson Bailey Collins Bell Shaw Murphy Miller Cox Richards Khan Marshall Anderson Simpson
    Ellis Adams Singh Begum Wilkinson Foster Chapman Powell Webb Rogers Gray Mason Ali Hunt
    Hussain Campbell Matthews Owen Palmer Holmes Mills Barnes Knight Lloyd Butler Russell Barker
    Fisher Stevens Jenkins Murray Dixon Harvey Graham Pearson Ahmed Fletcher Walsh Kaur Gibson
    Howard Andrews Stewart Elliott Reynolds Saunders Payne Fox Ford Pearce Day Brooks West
    Lawrence Cole Atkinson Bradley Spencer Gill Dawson Ball Burton O'Brien Watts Rose Booth Perry
    Ryan Grant Wells Armstrong Francis Rees Hayes Hart Hudson Newman Barrett Webster Hunter
    Gregory Carr Lowe Page Marsh Riley Dunn Woods Parsons Berry Stone Reid Holland Hawkins
    Harding Porter Robertson Newton Oliver Reed Kennedy Williamson Bird Gardner Shah Dean Lane
    Cooke Bates Henderson Parry Burgess Bishop Walton Burns Nicholson Shepherd Ross Cross Long
    Freeman Warren Nicholls Hamilton Byrne Sutton McDonald Yates Hodgson Robson Curtis Hopkins
    O'Connor Harper Coleman Watkins Moss McCarthy Chambers O'Neill Griffin Sharp Hardy Wheeler
    Potter Osborne Johnston Gordon Doyle Wallace George Jordan Hutchinson Rowe Burke May
    Pritchard Gilbert Willis Higgins Read Miles Stevenson Stephenson Hammond Arnold Buckley
    Walters Hewitt Barber Nelson Slater Austin Sullivan Whitehead Mann Frost Lambert Stephens
    Blake Akhtar Lynch Goodwin Barton Woodward Thomson Cunningham Quinn Barnett Baxter Bibi
    Clayton Nash Greenwood Jennings Holt Kemp Poole Gallagher Bond Stokes Tucker Davidson Fowler
    Heath Norman Middleton Lawson Banks French Stanley Jarvis Gibbs Ferguson Hayward Carroll
    Rahman Sanders Iqbal Mahmood Chaudhry Mistry Parmar Sharma Kumar Gupta Chauhan Joshi Mehta
    Desai Rana Sandhu Sidhu Dhillon Bains Johal Rehman Ahmad Malik Aziz Siddiqui Qureshi Rashid
    Mirza Bashir Yousaf Hassan Mohamed Abdi Warsame Farah Osman Jama Okafor Okoro Adeyemi
    Okonkwo Eze Nwosu Mensah Osei Boateng Asante Owusu Addo Appiah Akinola Adeleke Bello Ogunleye
    Nowak Kowalski Wiśniewski Wójcik Kowalczyk Kamiński Lewandowski Zieliński Szymański Woźniak
    Dąbrowski Kozłowski Mazur Krawczyk Popescu Ionescu Popa Dumitru Chen Wang Li Zhang Liu Wong
    Chan Lam Cheung Nguyen Tran Müller Schmidt Öztürk Yılmaz Şahin Kaya Demir Çelik Fernandes
    D'Souza Pereira Rodrigues Santos Ferreira Gonçalves García Pérez Núñez Gómez Lefèvre Dubois
    Nørgaard O'Sullivan O'Reilly O'Donnell O'Leary O'Hara McLaughlin McKenzie MacDonald MacLeod
    McGregor Fraser Kerr Paterson Forbes Sinclair Duncan Black Boyle Donnelly Doherty Kavanagh
    Brennan Flynn Nolan Hogan Maguire Reilly Connolly Fitzgerald Driscoll Llewellyn Pugh Vaughan
    Bowen Rowlands Howells Morgans Prosser Jeffries Abbott Marsden Naylor Pickering Lindley
    Brookes Hirst Crowther Ackroyd Sykes Haigh Priestley Barlow Whittaker Ashworth Horrocks
    Entwistle Kershaw Rigby Tattersall Pilkington Hargreaves Heaton Bamford Crompton Unsworth
    """
)

# Short forms a clerk may have typed instead of the registered given name.
_NICKNAMES: dict[str, tuple[str, ...]] = {
    "William": ("Bill", "Will", "Billy", "Liam"),
    "Elizabeth": ("Liz", "Beth", "Lizzie", "Betty", "Eliza"),
    "Katherine": ("Kate", "Kathy", "Katie"),
    "Catherine": ("Cath", "Kate", "Cathy"),
    "Alexander": ("Alex", "Xander", "Sandy"),
    "Alexandra": ("Alex", "Lexi", "Sasha"),
    "Mohammed": ("Muhammad", "Mohammad", "Mohamed"),
    "Muhammad": ("Mohammed", "Mohammad", "Mohamed"),
    "Mohammad": ("Mohammed", "Muhammad"),
    "Robert": ("Rob", "Bob", "Bobby", "Robbie"),
    "Richard": ("Rich", "Rick", "Richie", "Dick"),
    "James": ("Jim", "Jimmy", "Jamie"),
    "Thomas": ("Tom", "Tommy"),
    "Joseph": ("Joe", "Joey"),
    "Michael": ("Mike", "Mikey", "Mick"),
    "Christopher": ("Chris", "Kit"),
    "Daniel": ("Dan", "Danny"),
    "Matthew": ("Matt",),
    "Benjamin": ("Ben", "Benji"),
    "Samuel": ("Sam", "Sammy"),
    "Jonathan": ("Jon", "Jonny"),
    "Nicholas": ("Nick", "Nicky"),
    "Anthony": ("Tony", "Ant"),
    "Edward": ("Ed", "Eddie", "Ted", "Ned"),
    "Henry": ("Harry", "Hal"),
    "Charlotte": ("Charlie", "Lottie"),
    "Margaret": ("Maggie", "Peggy", "Meg"),
    "Victoria": ("Vicky", "Tori"),
    "Rebecca": ("Becky", "Becca"),
    "Jessica": ("Jess", "Jessie"),
    "Samantha": ("Sam", "Sammy"),
    "Abigail": ("Abi", "Abby"),
    "Olivia": ("Liv", "Livvy"),
    "Isabella": ("Bella", "Izzy"),
    "Isabelle": ("Izzy", "Belle"),
    "Amelia": ("Millie", "Amy"),
    "Emily": ("Em", "Emmy"),
    "Jennifer": ("Jen", "Jenny"),
    "Patricia": ("Pat", "Trish"),
    "Susan": ("Sue", "Suzy"),
    "Deborah": ("Deb", "Debbie"),
    "Stephen": ("Steve",),
    "Steven": ("Steve",),
    "Andrew": ("Andy", "Drew"),
    "David": ("Dave", "Davy"),
    "Peter": ("Pete",),
    "Frederick": ("Fred", "Freddie"),
    "Oliver": ("Ollie",),
    "Theodore": ("Theo", "Ted"),
    "Archibald": ("Archie",),
    "Alfred": ("Alfie", "Alf"),
    "Zachary": ("Zach", "Zac"),
    "Joshua": ("Josh",),
    "Nathaniel": ("Nate", "Nat"),
    "Gabriel": ("Gabe",),
    "Eleanor": ("Ellie", "Nell"),
    "Florence": ("Flo", "Florrie"),
    "Penelope": ("Penny",),
    "Sophia": ("Sophie",),
    "Gabriella": ("Gabby", "Ella"),
    "Natalie": ("Nat",),
    "Jacqueline": ("Jackie",),
    "Kimberley": ("Kim",),
    "Danielle": ("Dani",),
    "Louise": ("Lou",),
    "Christine": ("Chris", "Tina"),
    "Wojciech": ("Wojtek",),
    "Małgorzata": ("Gosia",),
    "Katarzyna": ("Kasia",),
    "Aleksandra": ("Ola",),
    "Jakub": ("Kuba",),
    "Abdullahi": ("Abdi",),
    "Abdirahman": ("Abdi",),
    "Oluwaseun": ("Seun",),
    "Oluwatobi": ("Tobi",),
    "Adebayo": ("Bayo",),
    "Chiamaka": ("Amaka",),
    "Olufunmilayo": ("Funmi",),
    "Harpreet": ("Harry",),
}

# Twins whose parents chose near-identical names.
_SIMILAR_TWIN_NAMES: tuple[tuple[str, str, str], ...] = (
    ("Aidan", "Aiden", "M"),
    ("Jayden", "Jaden", "M"),
    ("Evan", "Ewan", "M"),
    ("Reece", "Rhys", "M"),
    ("Isabel", "Isobel", "F"),
    ("Lily", "Lilly", "F"),
    ("Layla", "Leila", "F"),
    ("Ava", "Eva", "F"),
)

_STREETS = _words(
    """
    Station Church Park Victoria Mill High London Manor School Queens Kings Green New Grange
    Windsor Albert York Orchard Meadow Oak Elm Chestnut Willow Beech Ash Birch Cedar Holly Maple
    Hawthorn Springfield Highfield Westfield Brook Bridge Castle Chapel Farm Hill Forest Abbey
    Priory Alexandra Stanley Nelson Shakespeare Tennyson Milton Byron Coleridge Wordsworth
    Kingsway Lime Poplar Rowan Sycamore Hazel Heather Clover Primrose Bluebell Foxglove Ferndale
    Riverside Canal Wharf Market Coronation Jubilee Balmoral Sandringham Nightingale Kestrel
    Swallow Lark Wren Falcon Sherwood Lancaster Warwick Kenilworth Stratford Leicester Rugby
    """
)
_STREET_TYPES = _words("Road Street Lane Avenue Close Drive Way Crescent Grove Court Gardens")
_STREET_TYPES_SHORT = _words("Rd St Ln Ave Cl Dr Way Cres Gr Ct Gdns")

# Letters used in inward postcodes (C, I, K, M, O and V never appear there).
_INWARD_LETTERS = np.array(list("ABDEFGHJLNPQRSTUWXYZ"), dtype=object)

# Keyboard neighbours, so that substitution typos look like slips of the finger.
_QWERTY_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_NEIGHBOURS: dict[str, str] = {}
for _row in _QWERTY_ROWS:
    for _i, _ch in enumerate(_row):
        _NEIGHBOURS[_ch] = _row[max(0, _i - 1) : _i] + _row[_i + 1 : _i + 2]
_ALPHABET = "abcdefghijklmnopqrstuvwxyz"

# Letters that Unicode decomposition does not fold to ASCII.
_FOLD_EXTRA = str.maketrans({"Ł": "L", "ł": "l", "Ø": "O", "ø": "o", "ı": "i", "ß": "ss"})


# --- County profiles: how each county's system records things, fixed by position so that any
# federation of four or more counties shows every variant. ---
_SEX_CODES = (("M", "F"), ("Male", "Female"), ("1", "2"), ("m", "f"))
_RECORD_ID_STYLES = (
    ("{abbr}-", 6),  # COV-000123
    ("{initial}", 7),  # W7730012
    ("{abbr}/", 8),  # LEI/00004512
    ("", 9),  # 104500321
    ("{lower}_", 6),  # sol_004512
    ("CR{initial}", 7),  # CRS0045120
)
_HOUSEHOLD_ID_STYLES = (("HH", 6), ("{abbr}-F", 5), ("FAM/", 7), ("", 8), ("G{initial}", 6))


@dataclass(frozen=True)
class _CountyProfile:
    index: int
    county: str
    abbr: str
    sex_codes: tuple[str, str]
    keeps_diacritics: bool
    apostrophes: Literal["keep", "drop", "space"]
    middle_names_dropped: float
    nhs_missing: float
    nhs_spaced: bool
    postcode_style: int
    short_street_types: bool
    double_barrel_single: float
    record_id_style: tuple[str, int]
    household_id_style: tuple[str, int]


def _profile(index: int, county: str) -> _CountyProfile:
    abbr = _COUNTY_TABLE[county][0]
    apostrophes: tuple[Literal["keep", "drop", "space"], ...] = ("keep", "drop", "keep", "space")
    return _CountyProfile(
        index=index,
        county=county,
        abbr=abbr,
        sex_codes=_SEX_CODES[index % len(_SEX_CODES)],
        keeps_diacritics=index % 2 == 0,
        apostrophes=apostrophes[index % len(apostrophes)],
        middle_names_dropped=1.0 if index % 5 == 3 else 0.2,
        nhs_missing=(0.30, 0.45, 0.35, 0.50, 0.40)[index % 5],
        nhs_spaced=index % 3 == 2,
        postcode_style=index % 3,
        short_street_types=index % 2 == 1,
        double_barrel_single=(0.15, 0.5, 0.8)[index % 3],
        record_id_style=_RECORD_ID_STYLES[index % len(_RECORD_ID_STYLES)],
        household_id_style=_HOUSEHOLD_ID_STYLES[index % len(_HOUSEHOLD_ID_STYLES)],
    )


# --- Public API. ---
@dataclass(frozen=True)
class SyntheticFederation:
    """Synthetic county exports and the truth behind them.

    Attributes:
        counties: County id -> export in the canonical county record shape (columns in
            canonical order, every value a string, missing values as ``""``).
        truth: One row per record of every county: ``county``, ``record_id``, ``person_id``,
            ``family_id``. Records of one person share a ``person_id``; people of one family
            (household over the years, including a later partner) share a ``family_id``.
    """

    counties: dict[str, pd.DataFrame]
    truth: pd.DataFrame


def generate_federation(
    *,
    counties: int = 6,
    records: int = 15_000,
    seed: int = 7,
    upper_case_county: bool = True,
) -> SyntheticFederation:
    """Generate a federation of synthetic county exports with ground truth.

    Args:
        counties: How many counties, taken in order from ``DEFAULT_COUNTIES``.
        records: Approximate total number of records over all counties (the result is within
            one family of it).
        seed: Seed of every random draw; the same arguments always give the same data.
        upper_case_county: Whether the last county's export is entirely upper case, as some
            older systems store it.

    Returns:
        The exports, keyed by county id in ``DEFAULT_COUNTIES`` order, and the truth.

    Raises:
        ValueError: If ``counties`` is not between 1 and ``len(DEFAULT_COUNTIES)`` or
            ``records`` is less than 1.
    """
    if not 1 <= counties <= len(DEFAULT_COUNTIES):
        raise ValueError(f"counties must be between 1 and {len(DEFAULT_COUNTIES)}")
    if records < 1:
        raise ValueError("records must be at least 1")
    county_ids = DEFAULT_COUNTIES[:counties]
    profiles = [_profile(i, c) for i, c in enumerate(county_ids)]
    # One independent stream per stage, so that a change in one stage leaves the others' draws
    # as they were.
    streams = np.random.SeedSequence(seed).spawn(5)
    rng_world, rng_names, rng_records, rng_corrupt, rng_ids = (
        np.random.default_rng(s) for s in streams
    )
    pyrng = random.Random(int(rng_corrupt.integers(2**62)))

    # Families are drawn with a margin and cut once the record count reaches the target.
    mean_k = float(np.dot(np.arange(1, 5).clip(max=counties), _COUNTIES_P))
    mean_children = float(np.dot(np.arange(1, 6), _CHILDREN_P))
    per_family = (1 + _P_TWO_ADULTS + mean_children) * mean_k * _P_PRESENT
    n_families = int(records / per_family * 1.2) + 16
    while True:
        world = _draw_world(rng_world, rng_names, n_families, counties)
        recs = _draw_records(rng_records, world, records)
        if recs is not None:
            break
        n_families *= 2  # pragma: no cover - the margin above is nearly always enough

    columns = _corrupt(rng_corrupt, pyrng, world, recs, profiles)
    frames, truth = _assemble(rng_ids, world, recs, columns, profiles)
    if upper_case_county:
        last = county_ids[-1]
        frames[last] = frames[last].apply(lambda s: s.str.upper())
        is_last = truth["county"] == last
        truth.loc[is_last, "record_id"] = truth.loc[is_last, "record_id"].str.upper()
    return SyntheticFederation(counties=frames, truth=truth)


def write_federation(
    federation: SyntheticFederation,
    counties_dir: Path,
    *,
    truth_path: Path | None = None,
    fmt: Literal["csv", "parquet"] = "csv",
) -> list[Path]:
    """Write each county's export to ``counties_dir/<county>.<fmt>`` and optionally the truth.

    Files are UTF-8 with a header row (CSV) or Parquet with string columns; missing values are
    empty strings. The truth never goes inside ``counties_dir``, where a reader taking one county
    per file would mistake it for a county.

    Args:
        federation: What ``generate_federation`` returned.
        counties_dir: Directory for the county files; created if missing.
        truth_path: Where to write the truth as CSV, or ``None`` to skip it.
        fmt: ``"csv"`` or ``"parquet"``.

    Returns:
        The county files written, in the federation's county order.

    Raises:
        ValueError: If ``truth_path`` is inside ``counties_dir`` or ``fmt`` is unknown.
    """
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"unknown format {fmt!r}; expected 'csv' or 'parquet'")
    counties_dir = Path(counties_dir)
    if truth_path is not None and Path(truth_path).resolve().is_relative_to(counties_dir.resolve()):
        raise ValueError("truth_path must not be inside counties_dir")
    counties_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for county, frame in federation.counties.items():
        path = counties_dir / f"{county}.{fmt}"
        if fmt == "csv":
            frame.to_csv(path, index=False, encoding="utf-8")
        else:
            frame.to_parquet(path, index=False)
        paths.append(path)
    if truth_path is not None:
        truth_path = Path(truth_path)
        truth_path.parent.mkdir(parents=True, exist_ok=True)
        federation.truth.to_csv(truth_path, index=False, encoding="utf-8")
    return paths


def true_pairs(truth: pd.DataFrame) -> set[tuple[str, str, str, str]]:
    """Every cross-county pair of records of the same person.

    Args:
        truth: A truth table with columns ``county``, ``record_id`` and ``person_id``.

    Returns:
        ``(county_l, record_id_l, county_r, record_id_r)`` tuples with
        ``(county_l, record_id_l) < (county_r, record_id_r)``.
    """
    keys = truth[["county", "record_id", "person_id"]].astype(str)
    pairs = keys.merge(keys, on="person_id", suffixes=("_l", "_r"))
    # Counties differ in a cross-county pair, so the county alone orders the two sides.
    pairs = pairs[pairs["county_l"] < pairs["county_r"]]
    return set(
        zip(
            pairs["county_l"],
            pairs["record_id_l"],
            pairs["county_r"],
            pairs["record_id_r"],
            strict=True,
        )
    )


# --- The world: families, people, and stays (a family's time in one county). ---
@dataclass(frozen=True)
class _World:
    # Families.
    n_families: int
    fam_k: _IntArray  # counties the family is known to
    fam_stay_start: _IntArray  # index of its first stay
    fam_surname: _ObjArray  # the children's registered surname (maybe "Smith-Jones")
    fam_double: _BoolArray  # fam_surname is double-barrelled
    fam_new_surname: _ObjArray  # after a new partner, or "" when none
    fam_primary_new_name: _BoolArray  # the primary carer takes the new partner's name
    # People, grouped by family.
    p_family: _IntArray
    p_member: _IntArray  # position in family: adults, then children, then a later partner
    p_adult: _BoolArray
    p_child_of_change: _BoolArray  # a child in a family whose surname changes
    p_primary: _BoolArray  # first adult: the primary carer
    p_old_partner: _BoolArray  # second adult of a family where a later partner arrives
    p_new_partner: _BoolArray
    p_male: _BoolArray
    p_dob: npt.NDArray[np.datetime64]
    p_given: _ObjArray
    p_middle: _ObjArray
    p_surname: _ObjArray
    p_maiden: _ObjArray  # earlier surname of a primary carer who took the family name, or ""
    p_nhs: _IntArray
    # Stays, grouped by family in chronological order.
    s_county: _IntArray
    s_order: _IntArray  # 0 for the family's first county, 1 for the next, ...
    s_outward: _ObjArray
    s_inward: _ObjArray
    s_house: _IntArray
    s_flat: _IntArray  # 0 when not a flat
    s_street: _IntArray
    s_street_type: _IntArray


def _zipf_weights(n: int, *, exponent: float = 1.0, shift: float = 2.5) -> npt.NDArray[np.float64]:
    weights = 1.0 / (np.arange(n, dtype=np.float64) + shift) ** exponent
    out: npt.NDArray[np.float64] = weights / weights.sum()
    return out


def _group_offsets(sizes: _IntArray) -> tuple[_IntArray, _IntArray]:
    """For groups of the given sizes laid end to end: each element's group and position in it."""
    group = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    starts = np.cumsum(sizes) - sizes
    position = np.arange(len(group), dtype=np.int64) - starts[group]
    return group, position


def _draw_world(
    rng: np.random.Generator, rng_names: np.random.Generator, n_families: int, n_counties: int
) -> _World:
    f = n_families
    n_adults = 1 + (rng.random(f) < _P_TWO_ADULTS).astype(np.int64)
    n_children = rng.choice(np.arange(1, 6), size=f, p=_CHILDREN_P).astype(np.int64)
    fam_k = rng.choice(np.arange(1, 5), size=f, p=_COUNTIES_P).astype(np.int64)
    fam_k = np.minimum(fam_k, n_counties)
    twins = (n_children >= 2) & (rng.random(f) < _P_TWINS / (1 - _CHILDREN_P[0]))
    change = (fam_k >= 2) & (rng.random(f) < _P_SURNAME_CHANGE)

    # Counties: a home county weighted by the county's size, then the later ones drawn without
    # replacement, favouring neighbours on the ring (Efraimidis-Spirakis keys).
    size = rng.lognormal(0.0, 0.35, n_counties)
    home = rng.choice(n_counties, size=f, p=size / size.sum())
    idx = np.arange(n_counties)
    dist = np.abs(idx[:, None] - idx[None, :])
    dist = np.minimum(dist, n_counties - dist)
    affinity = np.select([dist == 0, dist == 1, dist == 2], [0.0, 4.0, 1.5], 0.4) * size[None, :]
    with np.errstate(divide="ignore"):
        keys = rng.exponential(size=(f, n_counties)) / affinity[home]
    later = np.argsort(keys, axis=1, kind="stable")[:, : max(0, min(3, n_counties - 1))]
    route = np.concatenate([home[:, None], later], axis=1)
    fam_stay_start = np.cumsum(fam_k) - fam_k
    s_family, s_order = _group_offsets(fam_k)
    s_county = route[s_family, s_order].astype(np.int64)

    # Addresses, one per stay: moving county means a new address.
    n_stays = len(s_family)
    outward_lists = [_COUNTY_TABLE[c][1] for c in DEFAULT_COUNTIES[:n_counties]]
    outward_pick = rng.random(n_stays)
    s_outward = np.empty(n_stays, dtype=object)
    for c, outs in enumerate(outward_lists):
        at = s_county == c
        # Zipf over a county's districts: town centres are busier than the villages.
        choice = np.searchsorted(
            np.cumsum(_zipf_weights(len(outs), exponent=0.6)), outward_pick[at]
        )
        s_outward[at] = np.array(outs, dtype=object)[np.minimum(choice, len(outs) - 1)]
    inward_digit = rng.integers(0, 10, n_stays).astype(str).astype(object)
    letters = rng.integers(0, len(_INWARD_LETTERS), (n_stays, 2))
    s_inward = inward_digit + _INWARD_LETTERS[letters[:, 0]] + _INWARD_LETTERS[letters[:, 1]]
    s_house = (1 + rng.geometric(1 / 40, n_stays)).clip(max=320).astype(np.int64)
    s_flat = np.where(rng.random(n_stays) < _P_FLAT, rng.integers(1, 25, n_stays), 0)
    s_street = rng.integers(0, len(_STREETS), n_stays).astype(np.int64)
    s_street_type = rng.integers(0, len(_STREET_TYPES), n_stays).astype(np.int64)

    # People: adults first, then children, then (in surname-change families) the later partner.
    n_members = n_adults + n_children + change.astype(np.int64)
    p_family, p_member = _group_offsets(n_members)
    n_people = len(p_family)
    na, nc = n_adults[p_family], n_children[p_family]
    p_adult = (p_member < na) | (p_member >= na + nc)
    p_primary = p_member == 0
    p_new_partner = p_member == na + nc
    p_second_adult = (p_member == 1) & (na == 2)
    p_old_partner = p_second_adult & change[p_family]
    p_child = ~p_adult
    child_pos = np.where(p_child, p_member - na, -1)  # 0 = oldest child

    # Sex: the primary carer is usually the mother; partners usually of the other sex.
    u = rng.random(n_people)
    primary_male = (rng.random(f) < 0.1)[p_family]
    p_male = np.where(
        p_primary,
        primary_male,
        np.where(p_adult, np.where(u < 0.95, ~primary_male, primary_male), u < 0.51),
    )

    # Ages in days. Children: gaps of 10 months to 4 years between siblings (none for twins),
    # fitted inside 0-17; the primary carer had the oldest at 17-38; partners near her age.
    gap = rng.integers(300, 1500, n_people)
    gap = np.where(child_pos <= 0, 0, gap)
    gap = np.where(twins[p_family] & (child_pos == 1), 0, gap)
    cum_gap = np.cumsum(gap)
    fam_first = np.cumsum(n_members) - n_members
    cum_gap = cum_gap - (cum_gap[fam_first] - gap[fam_first])[p_family]  # within family
    fam_span = np.zeros(f, dtype=np.int64)
    np.maximum.at(fam_span, p_family, np.where(p_child, cum_gap, 0))
    max_child = int(18 * _YEAR) - 1
    youngest = (rng.random(f) * (max_child - fam_span)).astype(np.int64)
    oldest = youngest + fam_span
    child_age = oldest[p_family] - cum_gap
    primary_age = oldest + rng.integers(int(17.5 * _YEAR), int(38 * _YEAR), f)
    primary_age = primary_age.clip(int(18 * _YEAR), int(60 * _YEAR))
    partner_age = primary_age[p_family] + rng.normal(2 * _YEAR, 3 * _YEAR, n_people).astype(
        np.int64
    )
    partner_age = partner_age.clip(int(18 * _YEAR), int(60 * _YEAR) - 1)
    age = np.where(p_child, child_age, np.where(p_primary, primary_age[p_family], partner_age))
    p_dob = _REFERENCE_DATE - age.astype("timedelta64[D]")

    # Names.
    p_given = _draw_given(rng_names, p_male)
    # Twins with near-identical names (both children take the pair's sex).
    twin_fams = np.flatnonzero(twins & (rng_names.random(f) < _P_SIMILAR_TWIN_NAMES))
    pair = rng_names.integers(0, len(_SIMILAR_TWIN_NAMES), len(twin_fams))
    first_child = fam_first[twin_fams] + n_adults[twin_fams]
    for fam_first_child, k in zip(first_child, pair, strict=True):
        a, b, sex = _SIMILAR_TWIN_NAMES[k]
        p_given[fam_first_child], p_given[fam_first_child + 1] = a, b
        p_male[fam_first_child] = p_male[fam_first_child + 1] = sex == "M"
    # Nobody names two of their children alike: redraw clashes within a family.
    for _ in range(8):
        clash = _repeats_within_family(p_family, pd.factorize(p_given)[0], int(n_members.max()))
        if not clash.any():
            break
        p_given[clash] = _draw_given(rng_names, p_male[clash])

    has_middle = rng_names.random(n_people) < _P_MIDDLE
    two_middle = has_middle & (rng_names.random(n_people) < _P_TWO_MIDDLE)
    middle1 = _draw_given(rng_names, p_male)
    middle2 = _draw_given(rng_names, p_male)
    p_middle = np.where(
        two_middle, middle1 + " " + middle2, np.where(has_middle, middle1, "")
    ).astype(object)

    surname_w = _zipf_weights(len(_FAMILY_NAMES), exponent=0.9)
    family_names = np.array(_FAMILY_NAMES, dtype=object)
    fam_surname = family_names[rng_names.choice(len(_FAMILY_NAMES), f, p=surname_w)]
    double = np.flatnonzero(rng_names.random(f) < _P_DOUBLE_BARRELLED)
    second = family_names[rng_names.choice(len(_FAMILY_NAMES), len(double), p=surname_w)]
    fam_double = np.zeros(f, dtype=bool)
    for fam, other in zip(double, second, strict=True):
        if other != fam_surname[fam]:
            fam_surname[fam] = f"{fam_surname[fam]}-{other}"
            fam_double[fam] = True
    own_name = family_names[rng_names.choice(len(_FAMILY_NAMES), f, p=surname_w)]
    keeps_own = rng_names.random(f) < _P_PRIMARY_KEEPS_OWN_NAME
    new_name = family_names[rng_names.choice(len(_FAMILY_NAMES), f, p=surname_w)]
    fam_new_surname = np.where(change, new_name, "").astype(object)
    fam_primary_new_name = change & (rng_names.random(f) < 0.5)

    pf = p_family
    p_surname = np.where(p_primary & keeps_own[pf], own_name[pf], fam_surname[pf])
    p_surname = np.where(p_new_partner, fam_new_surname[pf], p_surname).astype(object)
    p_maiden = np.where(p_primary & ~keeps_own[pf] & ~p_male, own_name[pf], "").astype(object)

    return _World(
        n_families=f,
        fam_k=fam_k,
        fam_stay_start=fam_stay_start,
        fam_surname=fam_surname,
        fam_double=fam_double,
        fam_new_surname=fam_new_surname,
        fam_primary_new_name=fam_primary_new_name,
        p_family=p_family,
        p_member=p_member,
        p_adult=p_adult,
        p_child_of_change=p_child & change[pf],
        p_primary=p_primary,
        p_old_partner=p_old_partner,
        p_new_partner=p_new_partner,
        p_male=p_male,
        p_dob=p_dob,
        p_given=p_given,
        p_middle=p_middle,
        p_surname=p_surname,
        p_maiden=p_maiden,
        p_nhs=_draw_nhs_numbers(rng, n_people),
        s_county=s_county,
        s_order=s_order,
        s_outward=s_outward,
        s_inward=s_inward,
        s_house=s_house,
        s_flat=s_flat,
        s_street=s_street,
        s_street_type=s_street_type,
    )


def _repeats_within_family(family: _IntArray, code: _IntArray, largest: int) -> _BoolArray:
    """Whether each person's name code already occurs earlier in their (contiguous) family."""
    # Families are small, so comparing with the few people before is cheaper than hashing.
    repeat = np.zeros(len(family), dtype=bool)
    for lag in range(1, largest):
        same = (family[lag:] == family[:-lag]) & (code[lag:] == code[:-lag])
        repeat[lag:] |= same
    return repeat


@functools.cache
def _given_tables() -> tuple[
    _ObjArray, npt.NDArray[np.float64], _ObjArray, npt.NDArray[np.float64]
]:
    male = np.array(_MALE_NAMES, dtype=object)
    female = np.array(_FEMALE_NAMES, dtype=object)
    return (
        male,
        np.cumsum(_zipf_weights(len(male), exponent=0.9)),
        female,
        np.cumsum(_zipf_weights(len(female), exponent=0.9)),
    )


def _draw_given(rng: np.random.Generator, male: _BoolArray) -> _ObjArray:
    male_names, male_cdf, female_names, female_cdf = _given_tables()
    u = rng.random(len(male))
    m = np.minimum(np.searchsorted(male_cdf, u), len(male_names) - 1)
    w = np.minimum(np.searchsorted(female_cdf, u), len(female_names) - 1)
    out: _ObjArray = np.where(male, male_names[m], female_names[w]).astype(object)
    return out


def _nhs_check_digit(prefix: _IntArray) -> _IntArray:
    """Mod-11 check digit of nine-digit prefixes; 10 means the prefix has no valid number."""
    total = np.zeros(len(prefix), dtype=np.int64)
    rest = prefix.copy()
    for weight in range(2, 11):  # last digit first
        rest, digit = np.divmod(rest, 10)
        total += weight * digit
    check = 11 - total % 11
    out: _IntArray = np.where(check == 11, 0, check)
    return out


def _draw_nhs_numbers(rng: np.random.Generator, n: int) -> _IntArray:
    """Distinct valid NHS numbers (as integers, all ten digits, first digit 4-8)."""
    # Distinct by construction, without a hash table: increasing prefixes with random gaps, of
    # which one in eleven has no valid check digit, then a random choice of n in random order.
    candidates = n + n // 5 + 64
    mean_gap = max(1, 400_000_000 // candidates)
    prefix = 400_000_000 + np.cumsum(rng.integers(1, 2 * mean_gap, candidates, dtype=np.int64))
    check = _nhs_check_digit(prefix)
    valid = np.flatnonzero((check != 10) & (prefix < 1_000_000_000))
    if len(valid) < n:  # pragma: no cover - five standard deviations away
        raise RuntimeError("could not draw enough NHS numbers")
    chosen = rng.permutation(valid)[:n]
    out: _IntArray = prefix[chosen] * 10 + check[chosen]
    return out


# --- Records: people in the counties their family was known to. ---
@dataclass(frozen=True)
class _Records:
    person: _IntArray
    stay: _IntArray
    county: _IntArray
    order: _IntArray


def _draw_records(rng: np.random.Generator, world: _World, target: int) -> _Records | None:
    """One record per person per stay of their family, cut at the target; None if too few."""
    w = world
    k = w.fam_k[w.p_family]
    person, order = _group_offsets(k)
    stay = w.fam_stay_start[w.p_family[person]] + order
    present = rng.random(len(person)) < _P_PRESENT
    # The old partner is gone after the move and the new one arrives with it.
    present &= ~(w.p_old_partner[person] & (order >= 1))
    present &= ~(w.p_new_partner[person] & (order == 0))
    person, stay, order = person[present], stay[present], order[present]
    per_family = np.bincount(w.p_family[person], minlength=w.n_families)
    cumulative = np.cumsum(per_family)
    if cumulative[-1] < target:
        return None
    last_family = int(np.searchsorted(cumulative, target))
    keep = np.flatnonzero(w.p_family[person] <= last_family)
    # Put records in their final order now (by county, then at random, which scatters households
    # through each file): every string made from here on is laid out in memory in file order,
    # which makes the final DataFrames several times faster to build.
    county = w.s_county[stay[keep]]
    final = keep[np.lexsort((rng.random(len(keep)), county))]
    return _Records(
        person=person[final],
        stay=stay[final],
        county=w.s_county[stay[final]],
        order=order[final],
    )


# --- Corruption: each county's copy of each record. ---
def _map_unique(values: _ObjArray, func: Callable[[str], str]) -> _ObjArray:
    """Apply a string function once per distinct value (names repeat a lot)."""
    codes, uniques = pd.factorize(values)
    mapped = np.array([func(u) for u in uniques], dtype=object)
    out: _ObjArray = mapped[codes]
    return out


def _fold(text: str) -> str:
    """Strip diacritics: Zoë -> Zoe, Łukasz -> Lukasz."""
    if text.isascii():
        return text
    decomposed = unicodedata.normalize("NFKD", text.translate(_FOLD_EXTRA))
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def _replace_apostrophe(text: str, sub: str) -> str:
    return text.replace("'", sub)


def _typo(name: str, rng: random.Random) -> str:
    """One slip of the keyboard: insert, delete, substitute or transpose (not the first letter)."""
    n = len(name)
    if n < 2:
        return name
    kind = rng.randrange(4) if n >= 4 else 2
    i = rng.randrange(1, n)
    ch = name[i]
    lower = ch.lower()
    near = _NEIGHBOURS.get(lower) or _ALPHABET
    new = rng.choice(near)
    if ch.isupper():
        new = new.upper()
    if kind == 0:  # insert a neighbouring key next to this one
        out = name[:i] + new + name[i:]
    elif kind == 1:  # delete
        out = name[:i] + name[i + 1 :]
    elif kind == 3 and i + 1 < n and name[i] != name[i + 1]:  # transpose
        out = name[:i] + name[i + 1] + name[i] + name[i + 2 :]
    else:  # substitute
        out = name[:i] + new + name[i + 1 :]
    return out if out != name else name[:i] + rng.choice(_ALPHABET) + name[i:]


# Digits of YYYY-MM-DD a slip may hit: the decade rarely, the last digits of year and day most.
_DOB_TYPO_POSITIONS = (2, 3, 3, 5, 6, 8, 9, 9)


def _dob_typo(dob: str, rng: random.Random) -> str:
    """Change one digit of the year's last two, the month or the day, keeping a valid past date."""
    for _ in range(20):
        i = rng.choice(_DOB_TYPO_POSITIONS)
        candidate = dob[:i] + str(rng.randrange(10)) + dob[i + 1 :]
        # A system would refuse a date in the future; ISO dates compare as strings.
        if candidate == dob or candidate > _REFERENCE_DAY:
            continue
        try:
            dt.date.fromisoformat(candidate)
        except ValueError:
            continue
        return candidate
    return dob


def _nhs_typo(number: str, rng: random.Random) -> str:
    """Change one digit, keeping any spaces: a single wrong digit always fails the mod-11 check."""
    positions = [i for i, ch in enumerate(number) if ch.isdigit()]
    i = rng.choice(positions)
    digit = str((int(number[i]) + rng.randrange(1, 10)) % 10)
    return number[:i] + digit + number[i + 1 :]


def _apply_sparse(
    values: _ObjArray,
    mask: _BoolArray,
    func: Callable[[str, random.Random], str],
    rng: random.Random,
) -> None:
    """Apply ``func`` in place to the masked, non-empty values."""
    for i in np.flatnonzero(mask):
        if values[i]:
            values[i] = func(values[i], rng)


def _corrupt(
    rng: np.random.Generator,
    pyrng: random.Random,
    world: _World,
    recs: _Records,
    profiles: list[_CountyProfile],
) -> dict[str, _ObjArray]:
    """Each county's copy of each record, as object arrays of strings (missing = "")."""
    w, p, s = world, recs.person, recs.stay
    n = len(p)
    fam = w.p_family[p]
    county = recs.county

    def county_flag(values: Sequence[float]) -> npt.NDArray[np.float64]:
        return np.asarray(values, dtype=np.float64)[county]

    def chance(prob: float | npt.NDArray[np.float64]) -> _BoolArray:
        out: _BoolArray = rng.random(n) < prob
        return out

    # The recorded surname, before the clerk's own mistakes.
    later = recs.order >= 1
    changed_child = w.p_child_of_change[p] & later
    changed_primary = w.p_primary[p] & w.fam_primary_new_name[fam] & later
    family_name = np.where(changed_child | changed_primary, w.fam_new_surname[fam], w.p_surname[p])
    family_name = family_name.astype(object)
    # Whether a county kept the old surname is a property of its file on the household.
    stay_u = rng.random(len(w.s_county))
    prev_recorded = stay_u[s] < _P_PREVIOUS_NAME_RECORDED
    previous = np.where((changed_child | changed_primary) & prev_recorded, w.p_surname[p], "")
    previous = previous.astype(object)
    maiden = (w.p_maiden[p] != "") & chance(_P_MAIDEN_NAME_RECORDED)
    # Most recent first: "Taylor;Smith" for a mother born Smith, then Taylor, now Dhillon.
    both = maiden & (previous != "")
    previous[both] = previous[both] + ";" + w.p_maiden[p[both]]
    previous[maiden & ~both] = w.p_maiden[p[maiden & ~both]]

    # Double-barrelled surnames recorded as one of the two, or with a space, by some counties.
    is_double = w.fam_double[fam] & (family_name == w.fam_surname[fam])
    stay_u2 = rng.random(len(w.s_county))
    single = is_double & (stay_u2[s] < county_flag([pr.double_barrel_single for pr in profiles]))
    # One choice per household and county: the first name, the second, or a space for the hyphen.
    variant = (s % 3).astype(np.int64)
    for i in np.flatnonzero(single):
        first, second = str(family_name[i]).split("-", 1)
        family_name[i] = (first, second, f"{first} {second}")[variant[i]]

    # Given names: short forms; middle names: not every system records them.
    given = w.p_given[p]
    has_nick = pd.Series(w.p_given).isin(list(_NICKNAMES)).to_numpy()[p]
    for i in np.flatnonzero(has_nick & chance(_P_NICKNAME)):
        given[i] = pyrng.choice(_NICKNAMES[given[i]])
    middle = w.p_middle[p]
    middle[chance(county_flag([pr.middle_names_dropped for pr in profiles]))] = ""

    # Spelling conventions of each county's system.
    bounds = np.searchsorted(county, np.arange(len(profiles) + 1))  # records are by county
    for pr in profiles:
        at = slice(bounds[pr.index], bounds[pr.index + 1])
        for col in (given, middle, family_name, previous):
            if not pr.keeps_diacritics:
                col[at] = _map_unique(col[at], _fold)
            if pr.apostrophes != "keep":
                sub = "" if pr.apostrophes == "drop" else " "
                col[at] = _map_unique(col[at], functools.partial(_replace_apostrophe, sub=sub))

    # Keyboard slips.
    _apply_sparse(given, chance(_P_GIVEN_TYPO), _typo, pyrng)
    _apply_sparse(middle, chance(_P_MIDDLE_TYPO), _typo, pyrng)
    _apply_sparse(family_name, chance(_P_FAMILY_TYPO), _typo, pyrng)

    # Dates of birth: day and month swapped (only possible when day <= 12), digit slips, missing.
    # Strings are made once per person and shared by the records that keep them intact.
    month_start = w.p_dob.astype("datetime64[M]")
    year = (w.p_dob.astype("datetime64[Y]").astype(np.int64) + 1970)[p]
    month = (month_start.astype(np.int64) % 12 + 1)[p]
    day = ((w.p_dob - month_start).astype(np.int64) + 1)[p]
    dob = np.datetime_as_string(w.p_dob, unit="D").astype(object)[p]
    swap = (day <= 12) & (day != month) & chance(_P_DOB_SWAP)
    for i in np.flatnonzero(swap):
        dob[i] = f"{year[i]:04d}-{day[i]:02d}-{month[i]:02d}"
    _apply_sparse(dob, chance(_P_DOB_TYPO) & ~swap, _dob_typo, pyrng)
    # Every record keeps a name or a date of birth.
    given[chance(_P_GIVEN_MISSING)] = ""
    dob[chance(_P_DOB_MISSING) & (given != "")] = ""

    # Sex, coded the county's way.
    male_code = np.array([pr.sex_codes[0] for pr in profiles], dtype=object)[county]
    female_code = np.array([pr.sex_codes[1] for pr in profiles], dtype=object)[county]
    sex = np.where(w.p_male[p], male_code, female_code).astype(object)
    sex[chance(_P_SEX_MISSING)] = ""

    # NHS numbers: often missing, occasionally mistyped (one digit changed always fails mod 11).
    nhs_text = w.p_nhs.astype("U10")  # all ten digits: the first is 4-8
    # "943 476 5919", built on the (people x 10) character view of the numbers.
    chars = nhs_text.view("U1").reshape(-1, 10)
    space = np.full((len(chars), 1), " ")
    spaced = np.concatenate([chars[:, :3], space, chars[:, 3:6], space, chars[:, 6:]], axis=1)
    spaced_text = np.ascontiguousarray(spaced).view("U12").ravel()
    nhs_formats = np.stack([nhs_text.astype(object), spaced_text.astype(object)])
    nhs_style = np.asarray([pr.nhs_spaced for pr in profiles], dtype=np.int64)[county]
    nhs = nhs_formats[nhs_style, p]
    nhs[chance(county_flag([pr.nhs_missing for pr in profiles]))] = ""
    _apply_sparse(nhs, chance(_P_NHS_TYPO), _nhs_typo, pyrng)

    # Postcodes: the county's usual format, with stray formats from manual entry. Strings are
    # made once per stay (household in a county) and shared by its records.
    outward, inward = w.s_outward, w.s_inward
    postcode_formats = np.stack(
        [
            outward + " " + inward,  # CV1 2AB
            np.strings.lower((outward + inward).astype(str)).astype(object),  # cv12ab
            " " + outward + "  " + inward + " ",  # " CV1  2AB "
        ]
    )
    style = np.asarray([pr.postcode_style for pr in profiles], dtype=np.int64)[county]
    style = np.where(chance(_P_POSTCODE_ODD_FORMAT), rng.integers(0, 3, n), style)
    postcode = postcode_formats[style, s]
    postcode[chance(_P_POSTCODE_MISSING)] = ""

    # Addresses: "12 Station Road", "Flat 3, 12 Station Rd", once per stay.
    short = np.asarray([pr.short_street_types for pr in profiles])[w.s_county]
    street_type = np.where(
        short,
        np.array(_STREET_TYPES_SHORT, dtype=object)[w.s_street_type],
        np.array(_STREET_TYPES, dtype=object)[w.s_street_type],
    )
    flat = np.where(w.s_flat > 0, "Flat " + w.s_flat.astype(str).astype(object) + ", ", "")
    stay_address = (
        flat.astype(object)
        + w.s_house.astype(str).astype(object)
        + " "
        + np.array(_STREETS, dtype=object)[w.s_street]
        + " "
        + street_type
    )
    address = stay_address[s]
    address[chance(_P_ADDRESS_MISSING)] = ""

    role = np.where(w.p_adult[p], "adult", "child").astype(object)
    return {
        "role": role,
        "given_name": given,
        "middle_names": middle,
        "family_name": family_name,
        "previous_family_names": previous,
        "date_of_birth": dob,
        "sex": sex,
        "nhs_number": nhs,
        "postcode": postcode,
        "address": address,
    }


# --- Identifiers and assembly. ---
def _format_ids(style: tuple[str, int], profile: _CountyProfile, numbers: _IntArray) -> _ObjArray:
    template, width = style
    prefix = template.format(abbr=profile.abbr, initial=profile.abbr[0], lower=profile.county[:3])
    digits = np.strings.zfill(numbers.astype(str), width)
    out: _ObjArray = np.strings.add(prefix, digits).astype(object)
    return out


def _increasing_numbers(rng: np.random.Generator, n: int, width: int) -> _IntArray:
    """Distinct increasing numbers with gaps (deleted or other records), starting anywhere."""
    low = 10 ** (width - 1) if width >= 9 else 1  # no leading zeros for bare numbers
    start = low + int(rng.integers(0, 10 ** (width - 2)))
    out: _IntArray = start + np.cumsum(rng.integers(1, 4, n))
    return out


def _assemble(
    rng: np.random.Generator,
    world: _World,
    recs: _Records,
    columns: dict[str, _ObjArray],
    profiles: list[_CountyProfile],
) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    # Records are already in file order (see _draw_records): each county is one slice.
    bounds = np.searchsorted(recs.county, np.arange(len(profiles) + 1))
    frames: dict[str, pd.DataFrame] = {}
    truth_parts: list[pd.DataFrame] = []
    person_ids = np.strings.add("P", np.strings.zfill(recs.person.astype(str), 7))
    family_ids = np.strings.add("F", np.strings.zfill(world.p_family[recs.person].astype(str), 6))
    for pr in profiles:
        rows = slice(bounds[pr.index], bounds[pr.index + 1])
        record_id = _format_ids(
            pr.record_id_style,
            pr,
            _increasing_numbers(rng, rows.stop - rows.start, pr.record_id_style[1]),
        )
        # Household numbers: one per stay (family) in this county, unrelated to row order.
        stays = recs.stay[rows]
        codes, uniques = pd.factorize(stays)
        shuffled = rng.permutation(len(uniques))
        household_numbers = _increasing_numbers(rng, len(uniques), pr.household_id_style[1])
        household_id = _format_ids(pr.household_id_style, pr, household_numbers[shuffled][codes])
        data = {"record_id": record_id, "household_id": household_id}
        data.update({name: values[rows] for name, values in columns.items()})
        frames[pr.county] = pd.DataFrame({c: data[c] for c in _COLUMNS}, dtype=str)
        truth_parts.append(
            pd.DataFrame(
                {
                    "county": pr.county,
                    "record_id": record_id,
                    "person_id": person_ids[rows],
                    "family_id": family_ids[rows],
                },
                dtype=str,
            )
        )
    truth = pd.concat(truth_parts, ignore_index=True)
    return frames, truth
