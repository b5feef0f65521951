#!/usr/bin/env python3
"""Generate the synthetic data set of the peftrt LoRA demo (order requests -> JSON).

The demo fine-tunes SmolLM2-135M-Instruct with LoRA to turn a customer's free-text order request
into the nested JSON of data/demo/order.schema.json. This script writes, into --out DIR:

  train.jsonl, test.jsonl, dev.jsonl         {"id", "description", "target"}  (orders)
  general_train.jsonl, general_test.jsonl    {"id", "instruction", "response"} (general tasks)

The general set (arithmetic, unit conversion, sorting, capitals, reversing, letter counting,
antonyms, one-sentence answers) has programmatically correct short answers; it is mixed into
training against forgetting and feeds a second adapter.

Design
  * Deterministic: only random.Random streams (one per split, seeded from random.Random(seed)),
    no set/dict-hash ordering, fixed JSON formatting. Same arguments -> byte-identical files.
    The self-check generates everything twice in memory and compares.
  * Each order is drawn first (the target), then rendered to text: every part (greeting, name,
    contact, items, shipping, gift wrap, coupon) has several phrasing templates; the parts are
    shuffled and joined in one of three layouts (prose, bullet list, run-on sentence).
    Distractors never reach the target: irrelevant sentences (often with numbers), products and
    colours explicitly not wanted, an expired coupon code, and changed minds
    ("actually, make that 3 mugs instead of 2" -> 3).
  * Unambiguous by construction: products within an order are distinct, shipping method is always
    stated, absent information -> null, gift_wrap false unless asked, sizes only for apparel,
    number words only exact ("two", "a dozen" = 12). Phone numbers, emails, postal codes and
    coupon codes are copied verbatim into the target.
  * Held-out test: first names, last names, streets and cities come from disjoint train/test pools,
    and every template group has test-only phrasings; training draws from further train-only
    phrasings instead (TEMPLATES[part] = (shared, test_only, train_only, dev_only)).
  * Development split (dev.jsonl, for scripts/demo_dev.py): held out like the test split, with its
    own pools and phrasings (dev_only), so the demo's settings are chosen on unseen wordings
    without looking at the test split. Its random stream is separate, so its size changes no
    other file.
    Product and colour catalogues are shared. General tasks: every question has an instance key
    (e.g. ("capital", "France"), whatever the phrasing); test keys never occur in train, and the
    last HOLDOUT capitals/antonyms/topics are test-only.
  * Descriptions are 150-500 characters and the compact target JSON under 450 (rejection sampling).
  * Self-check before writing (fails loudly): schema validation (jsonschema, draft 2020-12) and
    schema enum == CATALOG, sizes only on apparel, every verbatim target string (name, email, phone,
    address, colour, coupon) occurs in its description, unique ids, no test or dev description or
    target in train, no split-only name/street/city/template text in another order split, general
    train/test disjoint, and
    a second in-memory generation is byte-identical. Files are written to a temp name, then renamed.

Usage (repository root):
  .venv/bin/python scripts/demo_data.py --out runs/demo/data [--seed 1234] [--train 640]
      [--test 160] [--dev 60] [--general-train 240] [--general-test 40]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import sys
from pathlib import Path

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "data" / "demo" / "order.schema.json"

# ---------------------------------------------------------------------------------------------
# Catalogue (shared by train and test). (name, singular noun, plural noun, apparel)
CATALOG = [
    ("t-shirt", "t-shirt", "t-shirts", True), ("hoodie", "hoodie", "hoodies", True),
    ("socks", "pair of socks", "pairs of socks", True),
    ("sweatshirt", "sweatshirt", "sweatshirts", True),
    ("polo shirt", "polo shirt", "polo shirts", True), ("jacket", "jacket", "jackets", True),
    ("tank top", "tank top", "tank tops", True),
    ("joggers", "pair of joggers", "pairs of joggers", True),
    ("rain jacket", "rain jacket", "rain jackets", True), ("vest", "vest", "vests", True),
    ("mug", "mug", "mugs", False), ("notebook", "notebook", "notebooks", False),
    ("water bottle", "water bottle", "water bottles", False),
    ("backpack", "backpack", "backpacks", False), ("cap", "cap", "caps", False),
    ("beanie", "beanie", "beanies", False), ("tote bag", "tote bag", "tote bags", False),
    ("sticker pack", "sticker pack", "sticker packs", False),
    ("pen set", "pen set", "pen sets", False), ("phone case", "phone case", "phone cases", False),
    ("umbrella", "umbrella", "umbrellas", False), ("travel mug", "travel mug", "travel mugs", False),
    ("keychain", "keychain", "keychains", False), ("poster", "poster", "posters", False),
    ("mouse pad", "mouse pad", "mouse pads", False),
]
PRODUCT = {p[0]: p for p in CATALOG}
COLORS = ["black", "white", "grey", "navy", "red", "green", "blue", "yellow", "pink", "orange",
          "purple", "beige"]
SIZES = ["S", "M", "L", "XL"]
SIZE_WORDS = {"S": "small", "M": "medium", "L": "large", "XL": "extra large"}
NUM_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
             "eleven", "twelve"]

# Disjoint surface pools: (train, test, dev). The dev pool is only drawn by the development split
# (scripts/demo_dev.py), which picks the demo's settings without looking at the test split.
FIRST = (["Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Irene", "Jonas",
          "Kate", "Liam", "Maria", "Noah", "Olivia", "Paul", "Rosa", "Sam", "Tara", "Victor",
          "Wendy", "Yusuf", "Zoe", "Marco", "Lena", "Omar", "Julia", "Tom", "Sofia", "Erik",
          "Alice", "Boris", "Chloe", "Daniel", "Elena", "Frank", "Gina", "Henry", "Isla", "Jack",
          "Laura", "Mateo", "Nadia", "Oscar", "Priya", "Quinn", "Ruth", "Simon", "Theo", "Vera",
          "Xavier", "Yara", "Zara", "Aisha", "Bjorn", "Diego", "Fatima", "Hiro", "Ingrid", "Jamal",
          "Keiko", "Lars", "Pablo", "Rania", "Sven", "Tomas", "Yuki", "Amara", "Cyrus", "Freya"],
         ["Agnes", "Bruno", "Cecile", "Dmitri", "Elif", "Fiona", "Gustav", "Hana", "Ivo",
          "Jolene", "Kwame", "Ludmila"],
         ["Aurelio", "Beatrix", "Cosmin", "Dagny", "Eero", "Farida", "Gideon", "Henrike"])
LAST = (["Smith", "Miller", "Garcia", "Johnson", "Brown", "Schulz", "Rossi", "Dubois", "Jansen",
         "Kowalski", "Nguyen", "Patel", "Andersen", "Lopez", "Weber", "Murphy", "Costa", "Fischer",
         "Novak", "Larsen", "Bianchi", "Moreau", "Hughes", "Walsh", "Taylor", "Wilson", "Clark",
         "Lewis", "Young", "Wright", "Scott", "Adams", "Becker", "Hoffmann", "Wagner", "Klein",
         "Bakker", "Visser", "Mulder", "Leroy", "Girard", "Fontana", "Ricci", "Greco", "Marino",
         "Sato", "Tanaka", "Park", "Singh", "Khan", "Silva", "Santos", "Oliveira", "Ivanova",
         "Horvath", "Nielsen", "Holm", "Olsen", "Reid", "Ward"],
        ["Okafor", "Lindqvist", "Haddad", "Petrovic", "Yamada", "Castellano", "Brennan",
         "Vermeulen", "Szabo", "Achterberg"],
        ["Abernathy", "Kuznetsova", "Oyelaran", "Dalgaard", "Fontaine", "Matsuda"])
STREETS = (["Baker Street", "Elm Avenue", "Maple Road", "Oak Lane", "Station Road", "High Street",
            "Park Avenue", "Mill Lane", "Church Street", "Kastanienallee", "Keizersgracht",
            "Rue de la Paix", "Queen Street", "King Road", "Harbour View", "Cedar Court",
            "Lindenstrasse", "Willow Way", "Bridge Street", "Victoria Road", "Rose Lane",
            "Garden Row", "Canal Street", "Market Square", "Orchard Road", "Pine Street",
            "Chestnut Avenue", "Riverside Drive", "School Lane", "Castle Street", "Hafenstrasse",
            "Schillerweg", "Herengracht", "Rue Victor Hugo", "Avenue Foch", "Lakeshore Boulevard",
            "Sunset Drive", "Birch Grove"],
           ["Juniper Crescent", "Alder Close", "Bergstrasse", "Prinsengracht", "Rue Lafayette",
            "Hawthorn Drive", "Falcon Terrace", "Quarry Hill"],
           ["Sycamore Row", "Heron Quay", "Am Markt", "Rue Oberkampf", "Bramble Path"])
# (city, postal style)
CITIES = ([("Boston", "us"), ("Denver", "us"), ("Portland", "us"), ("Austin", "us"),
           ("London", "uk"), ("Leeds", "uk"), ("Bristol", "uk"), ("Berlin", "de"),
           ("Hamburg", "de"), ("Munich", "de"), ("Amsterdam", "nl"), ("Utrecht", "nl"),
           ("Toronto", "ca"), ("Vancouver", "ca"), ("Lyon", "fr"), ("Paris", "fr"),
           ("Seattle", "us"), ("Chicago", "us"), ("Phoenix", "us"), ("Atlanta", "us"), ("Miami", "us"),
           ("Raleigh", "us"), ("Madison", "us"), ("Boise", "us"), ("Savannah", "us"),
           ("Manchester", "uk"), ("Glasgow", "uk"), ("Cardiff", "uk"), ("York", "uk"), ("Oxford", "uk"),
           ("Brighton", "uk"), ("Sheffield", "uk"), ("Liverpool", "uk"), ("Cologne", "de"),
           ("Frankfurt", "de"), ("Stuttgart", "de"), ("Bremen", "de"), ("Hanover", "de"),
           ("Freiburg", "de"), ("Mainz", "de"), ("Rotterdam", "nl"), ("Delft", "nl"), ("Haarlem", "nl"),
           ("Leiden", "nl"), ("Maastricht", "nl"), ("Arnhem", "nl"), ("Ottawa", "ca"),
           ("Montreal", "ca"), ("Winnipeg", "ca"), ("Edmonton", "ca"), ("Quebec", "ca"),
           ("Marseille", "fr"), ("Bordeaux", "fr"), ("Toulouse", "fr"), ("Rennes", "fr"),
           ("Strasbourg", "fr")],
          [("Tucson", "us"), ("Omaha", "us"), ("Norwich", "uk"), ("Dresden", "de"),
           ("Groningen", "nl"), ("Halifax", "ca"), ("Nantes", "fr")],
          [("Spokane", "us"), ("Exeter", "uk"), ("Leipzig", "de"), ("Eindhoven", "nl"),
           ("Calgary", "ca"), ("Lille", "fr")])
DOMAINS = ["example.com", "mail.com", "inbox.org", "post.net", "webmail.co.uk", "fastmail.fm"]
COUPON_WORDS = ["SPRING", "SUMMER", "WELCOME", "FALL", "WINTER", "SAVE", "VIP", "HELLO", "BDAY"]

# Phrasing templates per part: (shared, test_only, train_only, dev_only). Train draws from shared
# and train_only, test from shared and test_only, dev from shared and dev_only: test-only
# phrasings measure generalisation to wordings never trained on, train-only ones widen the variety
# the model learns from (a model that saw two or three wordings of a part learns those strings,
# not the part), and dev-only ones let the settings be chosen on unseen wordings too, without the
# test split.
TEMPLATES = {
    "greeting": (["hi", "hello", "hey there", "good morning", "hi team", "hello there"],
                 ["greetings", "good afternoon folks"],
                 ["good evening", "hiya folks", "dear shop team", "morning all", "hi folks", "hello shop", "good day", "hi all", "hey team", "hello again"],
                 ["howdy", "hello friends"]),
    "name": (["I'm {n}", "this is {n}", "my name is {n}", "{n} here"],
             ["you're talking to {n}", "writing on behalf of myself, {n}"],
             ["the name is {n}", "the order is from {n}", "{n} speaking", "my name's {n}", "you've got {n} here", "this order is for {n}", "name on the order: {n}"],
             ["{n} on the line", "ordering as {n}"]),
    "signoff": (["thanks, {n}", "cheers, {n}", "thank you! {n}"], ["best regards, {n}"],
                ["many thanks, {n}", "talk soon, {n}", "ta very much, {n}", "best, {n}", "kind regards, {n}", "all the best, {n}", "thanks so much, {n}", "speak soon, {n}"],
                ["warm wishes, {n}", "with gratitude, {n}"]),
    "bullet_name": (["name: {n}", "customer: {n}"], ["ordered by: {n}"], ["buyer: {n}", "full name: {n}", "name on the order: {n}", "orderer: {n}", "person: {n}"],
                    ["client: {n}", "purchaser: {n}"]),
    "email": (["my email is {e}", "email: {e}", "you can reach me at {e}",
               "send the confirmation to {e}"], ["drop me a line at {e}"],
              ["reply to {e}", "my e-mail address is {e}", "contact email {e}", "email me at {e}", "my mail is {e}", "e-mail: {e}", "my address for emails is {e}"],
              ["write to {e}", "inbox: {e}"]),
    "phone": (["my phone number is {p}", "phone: {p}", "call me on {p} if needed",
               "my number is {p}"], ["mobile {p} for the courier"],
              ["you can phone me at {p}", "tel. no. {p}", "ring me on {p}", "text me at {p}", "my cell is {p}", "contact number: {p}", "reach me by phone at {p}"],
              ["dial {p} if there's a problem", "telephone {p}"]),
    "items": (["I'd like to order {items}", "could I get {items}", "I want {items}",
               "please send me {items}", "I'm after {items}"],
              ["my shopping list is {items}", "put me down for {items}"],
              ["can you send {items}", "I am ordering {items}", "I'd love to get {items}", "I'll take {items}",
               "my order is {items}", "I would like {items}", "please add {items} to my order", "I'm looking to buy {items}", "could you ship {items}", "order for {items}", "I'd like to buy {items}", "we need {items}", "send over {items} please"],
              ["kindly dispatch {items}", "I want to purchase {items}"]),
    "bullet_items": (["here's my order:", "I'd like the following:", "order:"],
                     ["items wanted:"],
                     ["what I need:", "the list:", "shopping cart:", "items:", "please send:", "I'd like to buy:", "I need:", "cart:"],
                     ["requested goods:", "to purchase:"]),
    "address": (["ship it to {street}, {city} {postal}", "my address is {street}, {postal} {city}",
                 "deliver to {street} in {city}, postal code {postal}",
                 "the address is {street}, {city}, {postal}"],
                ["it goes to {street} / {city} / {postal}"],
                ["send it to {street}, {postal} {city}", "address: {street}, {city}, {postal}",
                 "please post it to {street}, {city} ({postal})", "my address: {street}, {postal} {city}", "deliver it to {street}, {city}, {postal}", "shipping address is {street}, {city} {postal}", "I live at {street}, {postal} {city}", "the parcel should go to {street}, {city}, {postal}", "ship to: {street}, {city} {postal}", "address for delivery: {street}, {postal} {city}"],
                ["my place is {street}, {city} {postal}", "destination: {street}, {postal} {city}"]),
    "standard": (["standard shipping is fine", "regular delivery please",
                  "no rush, normal shipping works"], ["standard post will do"],
                 ["the cheapest shipping option is fine", "ordinary delivery is ok", "standard delivery", "normal shipping please", "regular shipping is ok", "the usual delivery is fine", "basic shipping will do", "ship it the normal way", "no hurry, standard is fine", "default shipping please", "I'm not in a rush, regular shipping", "standard is fine for shipping", "cheapest delivery please", "ordinary shipping please"],
                 ["economy shipping works for me", "take your time, the slow option is fine"]),
    "express": (["express shipping please", "I need it quickly, so express delivery",
                 "please send it express"], ["go with express, it's urgent"],
                ["I'd like express delivery", "rush it with express shipping please", "express please", "the fastest shipping you have", "I need it by tomorrow, express", "next-day delivery please", "speedy delivery please", "send it the quickest way", "overnight shipping if possible", "I'm in a hurry, express shipping", "fast delivery please", "express delivery, I need it soon", "quick shipping please", "it's needed fast, so express"],
                ["as fast as possible please", "priority courier please"]),
    "pickup": (["I'll pick it up in store", "store pickup please, no delivery needed",
                "I'll collect it myself from your shop"], ["I'll swing by and pick it up"],
               ["I'll come to the store to get it", "no shipping, I'll fetch it in person", "I'll come by the shop to collect it", "pickup in store please", "I'll grab it from the store myself", "collection from the shop please", "no need to ship, I'll come in", "click and collect please", "I'll pop into the shop to collect it", "I'll pick the order up myself", "in-store pickup", "don't ship it, I'll collect it", "I'll fetch it from the shop", "I can pick it up at your store"],
               ["hold it at the counter and I'll collect it", "I'll get it at your shop myself"]),
    "gift": (["please gift wrap it", "it's a present, so gift wrapping would be great",
              "could you wrap it as a gift"], ["wrap everything in gift paper please"],
             ["gift wrap please", "please wrap it up nicely, it's a gift", "wrap it as a present please", "gift wrapping please", "it's for a birthday, please wrap it", "add gift wrap", "could it be gift wrapped", "it's a gift, wrap it please", "please gift-wrap everything", "I'd like it wrapped as a gift"],
             ["present wrapping would be lovely", "make it look like a present please"]),
    "no_gift": (["no gift wrap needed", "no need to wrap it"], ["skip the gift wrapping"],
                ["don't bother with gift wrap", "no wrapping please", "no gift wrapping", "it's for me, no wrapping", "don't wrap it", "no wrap needed", "it's not a gift, so no wrapping", "skip wrapping"],
                ["wrapping isn't necessary", "plain box is fine, no wrap"]),
    "coupon": (["use code {c}", "I have a coupon: {c}", "please apply the discount code {c}"],
               ["promo {c} should still be valid"],
               ["discount code: {c}", "here's my voucher {c}", "coupon code {c}", "my promo code is {c}", "I'd like to use the coupon {c}", "code {c} for the discount", "voucher: {c}", "I've got a code, {c}"],
               ["redeem {c} please", "there's a discount code too: {c}"]),
    "no_coupon": (["I don't have a coupon this time", "my old code {c} has expired, so no coupon"],
                  ["no discount code, sadly ({c} ran out)"],
                  ["no voucher this time", "I tried {c} but it's expired", "no coupon code", "I have no discount code", "my code {c} is no longer valid", "{c} expired last month so no discount", "no coupon for this one", "no code to apply"],
                  ["no promo this time", "the code {c} didn't work, never mind"]),
    "noise": (["the weather has been awful this week", "I'm a long-time customer, {k} years now",
               "my last order (#{big}) arrived fine", "a friend recommended your shop",
               "we moved here {k} years ago", "love the new website by the way",
               "I'm buying these for my team of {k} people", "my birthday is on the {day}th"],
              ["it's been {k} days since I first saw your ad", "my cat knocked over {k} plants today"],
              ["my dog chewed through {k} shoes this month", "our office has {k} desks",
               "I walked {k} miles to the post office yesterday", "the bus was {k} minutes late again",
               "we baked {k} cakes for the party", "ticket #{big} is still open, by the way", "I saw your stall at the fair {k} weeks ago", "my neighbour ordered {k} things from you", "the last parcel took {k} days", "order #{big} was great", "I have {k} minutes before my meeting", "my sister works {k} doors down from you"],
              ["we have {k} kids at home", "I read {k} reviews before ordering"]),
    "no_product": (["no {x_pl} this time", "I don't need {a_x} anymore",
                    "I was going to add {a_x} but changed my mind"],
                   ["forget the {x_sg} I mentioned last time"],
                   ["skip the {x_sg}, I have one already", "leave out the {x_pl}",
                    "I don't want the {x_sg} after all", "I already have {a_x}, so none of those", "please don't include {a_x}", "drop the {x_pl}", "not ordering {a_x} today"],
                   ["ignore the {x_pl} from my last message", "I decided against {a_x}"]),
    "correction": (["actually, make that {q2} {pl} instead of {q1}", "wait, {q2} {pl}, not {q1}"],
                   ["scratch that, I need {q2} {pl} rather than {q1}"],
                   ["sorry, {q2} {pl}, not {q1}", "change the {pl} to {q2} (not {q1})", "I meant {q2} {pl}, not {q1}", "on second thought, {q2} {pl} instead of {q1}", "update: {q2} {pl}, not {q1}"],
                   ["correction: {q2} {pl} instead of {q1}", "no wait, {q2} {pl} (not {q1})"]),
}


SPLITS = ("train", "test", "dev")  # the index of each split's own pool in FIRST, LAST, STREETS, CITIES
ONLY = {"test": 1, "train": 2, "dev": 3}  # the index of each split's own phrasings in TEMPLATES[part]


def pick(rng: random.Random, part: str, split: str) -> str:
    return rng.choice(TEMPLATES[part][0] + TEMPLATES[part][ONLY[split]])


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


# ---------------------------------------------------------------------------------------------
# Orders: draw a target, then render it.
def postal(rng: random.Random, style: str) -> str:
    L = "ABCDEFGHJKLMNPRSTUVWXYZ"
    d = lambda: str(rng.randint(0, 9))
    if style in ("us", "de", "fr"):
        return str(rng.randint(1, 9)) + "".join(d() for _ in range(4))
    if style == "uk":
        return rng.choice(L) + rng.choice(L) + d() + " " + d() + rng.choice(L) + rng.choice(L)
    if style == "nl":
        return str(rng.randint(1, 9)) + d() + d() + d() + " " + rng.choice(L) + rng.choice(L)
    return rng.choice(L) + d() + rng.choice(L) + " " + d() + rng.choice(L) + d()  # ca


def email(rng: random.Random, first: str, last: str) -> str:
    f, l = first.lower(), last.lower()
    user = rng.choice([f"{f}.{l}", f, f"{f[0]}{l}{rng.randint(1, 99)}", f"{f}_{l}", f"{l}.{f[0]}"])
    return f"{user}@{rng.choice(DOMAINS)}"


def phone(rng: random.Random) -> str:
    n = lambda k: "".join(str(rng.randint(0, 9)) for _ in range(k))
    return rng.choice([f"+1 {rng.randint(201, 989)}-555-{n(4)}", f"({rng.randint(201, 989)}) 555-{n(4)}",
                       f"+44 7700 {n(6)}", f"030 {n(7)}", f"+31 6 {n(8)}", f"555.{n(3)}.{n(4)}",
                       f"+49 151 {n(8)}"])


def quantity(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.85:
        return rng.choice([1, 1, 1, 2, 2, 2, 3, 3, 4, 5])
    return 12 if r < 0.89 else rng.randint(6, 10)


def draw_order(rng: random.Random, split: str) -> dict:
    k = SPLITS.index(split)
    first, last = rng.choice(FIRST[k]), rng.choice(LAST[k])
    names = [p[0] for p in CATALOG]
    items = []
    for prod in rng.sample(names, rng.choice([1, 1, 2, 2, 2, 3, 3, 4])):
        size = rng.choice(SIZES) if PRODUCT[prod][3] and rng.random() < 0.8 else None
        color = rng.choice(COLORS) if rng.random() < 0.55 else None
        items.append({"product": prod, "quantity": quantity(rng), "size": size, "color": color})
    method = rng.choice(["standard", "standard", "express", "pickup"])
    address = None
    if method != "pickup":
        city, style = rng.choice(CITIES[k])
        address = {"street": f"{rng.randint(1, 240)} {rng.choice(STREETS[k])}", "city": city,
                   "postal_code": postal(rng, style)}
    coupon = None
    if rng.random() < 0.3:
        coupon = rng.choice(COUPON_WORDS) + str(rng.choice([10, 15, 20, 23, 24, 25, 50]))
    return {"customer": {"name": f"{first} {last}",
                         "email": email(rng, first, last) if rng.random() < 0.6 else None,
                         "phone": phone(rng) if rng.random() < 0.4 else None},
            "items": items,
            # The address before the method: a left-to-right decoder then writes the evidence
            # (an address, or null when the customer collects) before the choice the schema ties
            # to it (pickup <=> no address), instead of guessing a method and contradicting it.
            "shipping": {"address": address, "method": method},
            "gift_wrap": rng.random() < 0.25,
            "coupon": coupon}


def qty_text(rng: random.Random, q: int, next_word: str) -> str:
    if q == 1:
        return rng.choice([article(next_word), "one", "1"])
    if q == 12 and rng.random() < 0.5:
        return "a dozen"
    return NUM_WORDS[q] if q <= 12 and rng.random() < 0.4 else str(q)


def render_item(rng: random.Random, it: dict, split: str, q_shown: int, bullet: bool) -> str:
    _, sg, pl, _ = PRODUCT[it["product"]]
    color, size = it["color"], it["size"]
    # Style 2 ("hoodie: 2, black") reads well only as a bullet; style 3 is test-only, 4 train-only,
    # 5 dev-only.
    style = rng.choice(([0, 1, 2] if bullet else [0, 0, 1]) + [{"test": 3, "train": 4, "dev": 5}[split]])
    if style == 0:  # "2 black hoodies in size L"
        noun = (f"{color} " if color else "") + (sg if q_shown == 1 else pl)
        s = f"{qty_text(rng, q_shown, noun)} {noun}"
        if size:
            s += rng.choice([f" in size {size}", f", size {size}", f" in {SIZE_WORDS[size]}"])
    else:
        attrs = [a for a in (color, size and rng.choice([f"size {size}", SIZE_WORDS[size]])) if a]
        if style == 1:  # "2x hoodie (black, size L)"
            s = f"{q_shown}x {it['product']}" + (f" ({', '.join(attrs)})" if attrs else "")
        elif style == 2:  # "hoodie: 2, black, size L"
            s = f"{it['product']}: {', '.join([str(q_shown)] + attrs)}"
        elif style == 3:  # test only: "the hoodie (black, size L), quantity 2"
            s = f"the {it['product']}" + (f" ({', '.join(attrs)})" if attrs else "") + f", quantity {q_shown}"
        elif style == 4:  # train only: "hoodie x2 (black, size L)"
            s = f"{it['product']} x{q_shown}" + (f" ({', '.join(attrs)})" if attrs else "")
        else:  # dev only: "hoodie - qty 2 (black, size L)"
            s = f"{it['product']} - qty {q_shown}" + (f" ({', '.join(attrs)})" if attrs else "")
    if color and rng.random() < 0.15:
        other = rng.choice([c for c in COLORS if c != color])
        not_one = f"not the {other} {'one' if q_shown == 1 else 'ones'}"
        s = s[:-1] + f", {not_one})" if s.endswith(")") else s + f" ({not_one})"
    return s


def join_list(parts: list[str]) -> str:
    """'a, b and c'; with '; ' separators when an item itself has a comma outside brackets."""
    def bare_comma(s: str) -> bool:
        depth = 0
        for ch in s:
            depth += (ch == "(") - (ch == ")")
            if ch == "," and depth == 0:
                return True
        return False
    if len(parts) == 1:
        return parts[0]
    sep = "; " if any(bare_comma(p) for p in parts) else ", "
    return sep.join(parts[:-1]) + (sep + "and " if sep == "; " else " and ") + parts[-1]


def render_order(rng: random.Random, o: dict, split: str) -> str:
    c, sh = o["customer"], o["shipping"]
    layout = rng.choice(["prose", "prose", "bullets", "runon"])
    bullet = layout == "bullets"
    # Item phrases; maybe one changed mind (shown quantity differs, then corrected).
    shown, corrections = [], []
    for it in o["items"]:
        q = it["quantity"]
        if q >= 2 and not corrections and rng.random() < 0.15:
            q1 = rng.choice([x for x in range(1, 7) if x != q])
            shown.append(render_item(rng, it, split, q1, bullet))
            corrections.append(pick(rng, "correction", split).format(
                q2=q, q1=q1, pl=PRODUCT[it["product"]][2]))
        else:
            shown.append(render_item(rng, it, split, q, bullet))
    parts = []  # middle clauses, shuffled later
    if c["email"]:
        parts.append(pick(rng, "email", split).format(e=c["email"]))
    if c["phone"]:
        parts.append(pick(rng, "phone", split).format(p=c["phone"]))
    ship = [pick(rng, sh["method"], split)]
    if sh["address"]:
        a = sh["address"]
        ship.append(pick(rng, "address", split).format(street=a["street"], city=a["city"],
                                                       postal=a["postal_code"]))
        rng.shuffle(ship)
    parts += ship
    if o["gift_wrap"]:
        parts.append(pick(rng, "gift", split))
    elif rng.random() < 0.2:
        parts.append(pick(rng, "no_gift", split))
    code = lambda: rng.choice(COUPON_WORDS) + str(rng.choice([19, 21, 22]))
    if o["coupon"]:
        parts.append(pick(rng, "coupon", split).format(c=o["coupon"]))
    elif rng.random() < 0.15:
        parts.append(pick(rng, "no_coupon", split).format(c=code()))
    for _ in range(rng.choice([0, 1, 1, 2])):
        parts.append(pick(rng, "noise", split).format(k=rng.randint(2, 15), big=rng.randint(10000, 99999),
                                                     day=rng.randint(4, 20)))
    if rng.random() < 0.2:
        others = [p[0] for p in CATALOG if p[0] not in [it["product"] for it in o["items"]]]
        _, sg, pl, _ = PRODUCT[rng.choice(others)]
        parts.append(pick(rng, "no_product", split).format(x_pl=pl, x_sg=sg, a_x=f"{article(sg)} {sg}"))
    rng.shuffle(parts)

    name_first = rng.random() < 0.7
    greeting = pick(rng, "greeting", split) if rng.random() < 0.6 else None
    if layout == "bullets":
        head = [cap(greeting) + "!"] if greeting else []
        lines = head + [cap(pick(rng, "bullet_items", split))] + ["- " + s for s in shown]
        lines += ["- " + s for s in corrections]
        lines.append("- " + pick(rng, "bullet_name", split).format(n=c["name"]))
        lines += ["- " + s for s in parts]
        return "\n".join(lines)
    items_clause = pick(rng, "items", split).format(items=join_list(shown))
    body = [items_clause] + corrections
    pos = rng.randint(0, len(parts))
    clauses = parts[:pos] + body + parts[pos:]
    if name_first:
        clauses.insert(0, pick(rng, "name", split).format(n=c["name"]))
    tail = None if name_first else pick(rng, "signoff", split).format(n=c["name"])
    if layout == "prose":
        text = " ".join(cap(s) + "." for s in clauses)
        head = cap(greeting) + rng.choice(["! ", ". "]) if greeting else ""
    else:  # run-on
        text = clauses[0]
        for s in clauses[1:]:
            text += rng.choice([", ", ", and ", " and ", ", also ", ", oh and "]) + s
        text += "."
        head = cap(greeting) + ", " if greeting else ""
    text = head + text if head else cap(text)
    return text + (" " + cap(tail) if tail else "")


def compact(target: dict) -> str:
    return json.dumps(target, separators=(",", ":"), ensure_ascii=False)


def gen_orders(rng: random.Random, n: int, split: str, prefix: str) -> list[dict]:
    out = []
    while len(out) < n:
        o = draw_order(rng, split)
        d = render_order(rng, o, split)
        if 150 <= len(d) <= 500 and len(compact(o)) < 450:
            out.append({"id": f"{prefix}-{len(out) + 1:04d}", "description": d, "target": o})
    return out


# ---------------------------------------------------------------------------------------------
# General instruction tasks. Each generator takes (rng, test) and returns
# (key, instruction, response); `key` names the question instance independent of its phrasing
# (e.g. ("capital", "France")), so that train and test share no instance. The last entries of the
# small tables (HOLDOUT of each) are only used for test, so test always has unseen facts.
CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Egypt", "Cairo"),
            ("Kenya", "Nairobi"), ("Brazil", "Brasilia"), ("Norway", "Oslo"), ("Peru", "Lima"),
            ("Portugal", "Lisbon"), ("Poland", "Warsaw"), ("Greece", "Athens"), ("India", "New Delhi")]
ANTONYMS = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("early", "late"),
            ("light", "dark"), ("open", "closed"), ("strong", "weak"), ("full", "empty"),
            ("high", "low"), ("old", "new"), ("easy", "hard"), ("rich", "poor"), ("wet", "dry")]
WORDS = ["apple", "river", "garden", "yellow", "pencil", "window", "castle", "orange", "planet",
         "button", "silver", "forest", "candle", "market", "banana", "ladder", "mirror", "kitten",
         "violin", "harbor", "tomato", "bottle", "rocket", "zebra", "lemon", "island", "cookie"]
TOPICS = [("the ocean", "The ocean covers most of the Earth and is home to countless creatures."),
          ("coffee", "Coffee is a popular drink made from roasted coffee beans."),
          ("the moon", "The moon orbits the Earth and lights up the night sky."),
          ("bicycles", "Bicycles are a healthy and quiet way to get around town."),
          ("libraries", "Libraries let people borrow books and learn for free."),
          ("autumn", "In autumn, the leaves change colour and the days grow shorter."),
          ("bees", "Bees help flowers grow by carrying pollen from plant to plant."),
          ("mountains", "Mountains are tall landforms that can be covered in snow all year."),
          ("rain", "Rain brings fresh water that plants and animals need to live."),
          ("music", "Music can lift our mood and bring people together.")]
PEOPLE = ["Anna", "Ben", "Maya", "Leo", "Sara", "Tim", "Nina", "Omar"]
THINGS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells"]
# (big unit plural, big unit singular, small unit plural, factor)
UNITS = [("kilometers", "kilometer", "meters", 1000), ("kilograms", "kilogram", "grams", 1000),
         ("hours", "hour", "minutes", 60), ("meters", "meter", "centimeters", 100),
         ("liters", "liter", "milliliters", 1000), ("minutes", "minute", "seconds", 60),
         ("days", "day", "hours", 24), ("weeks", "week", "days", 7)]
POLITE = ["", "", "Sure! ", "Of course. ", "Happy to help. "]
HOLDOUT = 3


def table(tab: list, test: bool) -> list:
    return tab if test else tab[:-HOLDOUT]


def g_arith(r: random.Random, test: bool):
    p, t = r.choice(PEOPLE), r.choice(THINGS)
    a, b = r.randint(2, 40), r.randint(2, 30)
    kind = r.randint(0, 2)
    if kind == 0:
        return (("add", a, b), f"{p} has {a} {t} and gets {b} more. How many {t} does {p} have now?",
                f"{p} has {a} + {b} = {a + b} {t} now.")
    if kind == 1:
        a = a + b
        return (("sub", a, b), f"{p} had {a} {t} and gave away {b}. How many {t} are left?",
                f"{p} has {a} - {b} = {a - b} {t} left.")
    a, b = r.randint(2, 12), r.randint(2, 12)
    return (("mul", a, b), f"A box holds {a} {t}. How many {t} are in {b} boxes?",
            f"There are {a} x {b} = {a * b} {t} in {b} boxes.")


def g_convert(r: random.Random, test: bool):
    big, one, small, f = r.choice(UNITS)
    n = r.randint(2, 20)
    q = r.choice([f"How many {small} are in {n} {big}?", f"Convert {n} {big} to {small}."])
    return ("conv", big, n), q, f"{n} {big} is {n * f} {small}, because one {one} has {f} {small}."


def g_sort(r: random.Random, test: bool):
    ws = r.sample(WORDS, r.randint(3, 6))
    return (("sort",) + tuple(sorted(ws)), f"Sort these words alphabetically: {', '.join(ws)}.",
            f"In alphabetical order: {', '.join(sorted(ws))}.")


def g_capital(r: random.Random, test: bool):
    c, city = r.choice(table(CAPITALS, test))
    q = r.choice([f"What is the capital of {c}?", f"Which city is the capital of {c}?",
                  f"Name the capital city of {c}."])
    return ("capital", c), q, f"The capital of {c} is {city}."


def g_reverse(r: random.Random, test: bool):
    w = r.choice(WORDS)
    q = r.choice([f"Reverse the word '{w}'.", f"Spell '{w}' backwards."])
    return ("reverse", w), q, f"The word '{w}' reversed is '{w[::-1]}'."


def g_count(r: random.Random, test: bool):
    w = r.choice(WORDS)
    if r.random() < 0.5:
        return (("len", w), f"How many letters are in the word '{w}'?",
                f"The word '{w}' has {len(w)} letters.")
    ch = r.choice(w)
    n = w.count(ch)
    return (("count", w, ch), f"How many times does the letter '{ch}' appear in '{w}'?",
            f"The letter '{ch}' appears {n} time{'s' if n != 1 else ''} in '{w}'.")


def g_antonym(r: random.Random, test: bool):
    pair = r.choice(table(ANTONYMS, test))
    a, b = pair if r.random() < 0.5 else pair[::-1]
    q = r.choice([f"What is the opposite of '{a}'?", f"Give me an antonym for '{a}'."])
    return ("antonym", pair), q, f"The opposite of '{a}' is '{b}'."


def g_sentence(r: random.Random, test: bool):
    topic, ans = r.choice(table(TOPICS, test))
    q = r.choice([f"Write one sentence about {topic}.", f"Tell me one fact about {topic} in a sentence."])
    return ("sentence", topic), q, ans


GENERAL = [g_arith, g_convert, g_sort, g_capital, g_reverse, g_count, g_antonym, g_sentence]


def gen_general(rng: random.Random, n: int, prefix: str, test: bool,
                train_keys: set, seen_q: set[str]) -> list[dict]:
    """n records with unique instructions; for test, no instance key may occur in train_keys.
    The sets are used for membership only, so iteration order never depends on hashing."""
    out, tries = [], 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise SystemExit(f"{prefix}: cannot draw {n} distinct general tasks; lower the count")
        key, q, a = rng.choice(GENERAL)(rng, test)
        if q in seen_q or (test and key in train_keys):
            continue
        seen_q.add(q)
        if not test:
            train_keys.add(key)
        out.append({"id": f"{prefix}-{len(out) + 1:04d}", "instruction": q,
                    "response": rng.choice(POLITE) + a})
    return out


# ---------------------------------------------------------------------------------------------
def generate(args) -> dict[str, list[dict]]:
    master = random.Random(args.seed)
    seeds = [master.getrandbits(64) for _ in range(4)]  # the first three predate the dev split
    general_rng = random.Random(seeds[2])
    keys: set = set()
    seen_q: set[str] = set()
    return {
        "train": gen_orders(random.Random(seeds[0]), args.train, "train", "train"),
        "test": gen_orders(random.Random(seeds[1]), args.test, "test", "test"),
        "dev": gen_orders(random.Random(seeds[3]), args.dev, "dev", "dev"),
        "general_train": gen_general(general_rng, args.general_train, "general-train", False,
                                     keys, seen_q),
        "general_test": gen_general(general_rng, args.general_test, "general-test", True,
                                    keys, seen_q),
    }


def serialize(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def self_check(data: dict[str, list[dict]], again: dict[str, list[dict]]) -> None:
    import jsonschema

    if not __debug__:
        raise SystemExit("the self-check uses assert: run without python -O")

    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    enum = schema["properties"]["items"]["items"]["properties"]["product"]["enum"]
    assert enum == [p[0] for p in CATALOG], "schema product enum != CATALOG"
    validator = jsonschema.Draft202012Validator(schema)
    for split in SPLITS:
        for r in data[split]:
            t, desc = r["target"], r["description"]
            validator.validate(t)
            verbatim = [t["customer"]["name"], t["customer"]["email"], t["customer"]["phone"],
                        t["coupon"]] + list((t["shipping"]["address"] or {}).values())
            for it in t["items"]:
                assert it["size"] is None or PRODUCT[it["product"]][3], f"{r['id']}: size"
                verbatim.append(it["color"])
            for v in verbatim:  # copied strings must occur in the text
                assert v is None or v in desc, f"{r['id']}: {v!r} not in description"
    ids = [r["id"] for recs in data.values() for r in recs]
    assert len(ids) == len(set(ids)), "duplicate ids"
    train_d = {r["description"] for r in data["train"]}
    train_t = {compact(r["target"]) for r in data["train"]}
    for r in data["test"] + data["dev"]:
        assert r["description"] not in train_d, f"{r['id']}: description also in train"
        assert compact(r["target"]) not in train_t, f"{r['id']}: target also in train"
    text = {k: "\n".join(r["description"] for r in data[k]) for k in SPLITS}
    lower = {k: v.lower() for k, v in text.items()}
    pairs = list(itertools.permutations(range(len(SPLITS)), 2))  # (own split, another split)
    for pool in (FIRST, LAST, STREETS, CITIES):
        for k, j in pairs:  # each split's own names, streets and cities occur in no other split
            own, other = SPLITS[k], SPLITS[j]
            assert not set(pool[k]) & set(pool[j]), f"{own} and {other} pools overlap"
            for s in pool[k]:
                s = s if isinstance(s, str) else s[0]
                assert s not in text[other], f"{own}-only {s!r} found in {other}"
    for part, templates in TEMPLATES.items():
        for k, j in pairs:
            own, other = SPLITS[k], SPLITS[j]
            mine = templates[ONLY[own]]
            assert not set(templates[0]) & set(mine), f"{part}: a shared phrasing is also {own}-only"
            assert not set(mine) & set(templates[ONLY[other]]), f"{part}: {own}-only and {other}-only overlap"
            for t in mine:  # the longest literal chunk of each split-only template
                chunk = max(re.split(r"\{[a-z_0-9]+\}", t), key=len).strip().lower()
                assert len(chunk) >= 5 and chunk not in lower[other], f"{own}-only {part} template in {other}: {t!r}"
    gi = {r["instruction"] for r in data["general_train"]}
    assert not any(r["instruction"] in gi for r in data["general_test"]), "general overlap"
    for k in data:
        assert serialize(data[k]) == serialize(again[k]), f"{k}: not deterministic"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--train", type=int, default=640)
    ap.add_argument("--test", type=int, default=160)
    ap.add_argument("--dev", type=int, default=60,
                    help="development requests (own names, places and phrasings; scripts/demo_dev.py)")
    ap.add_argument("--general-train", type=int, default=240)
    ap.add_argument("--general-test", type=int, default=40)
    args = ap.parse_args()

    data = generate(args)
    self_check(data, generate(args))
    args.out.mkdir(parents=True, exist_ok=True)
    for name, recs in data.items():
        final = args.out / f"{name}.jsonl"
        tmp = args.out / f".{name}.jsonl.tmp"
        tmp.write_bytes(serialize(recs))
        os.replace(tmp, final)
    lens = [len(r["description"]) for r in data["train"] + data["test"]]
    print(f"demo_data: seed={args.seed} train={len(data['train'])} test={len(data['test'])} dev={len(data['dev'])} "
          f"general_train={len(data['general_train'])} general_test={len(data['general_test'])} "
          f"mean_description_chars={sum(lens) / len(lens):.1f} "
          f"(min {min(lens)}, max {max(lens)}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
