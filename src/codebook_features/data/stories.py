"""Generated children's stories with topics: the project's stand-in for TinyStories (DESIGN §2).

Each story is 3–8 sentences of simple English ("Once upon a time, there was a little girl
named Lily. ...") about one main **topic** (dragon, flower, fire, baby, princess, ocean, dog,
rain, music, space). A story is assembled from templates with slots (names, places, colours,
feelings, weather, topic objects): an opening, a topic introduction that always names the
topic, middle sentences that are topic sentences or shared generic sentences, and an ending.
Generation is deterministic given the seed, and story ``i`` depends only on ``(seed, i)``.

:func:`topic_regex` is what "mentions the topic" means in the steering evaluation: the
topic's core words (e.g. ``dragon``/``dragons``; ``flower``, ``petals``, ``bloom``...).
Generic sentences mention no topic; topic sentences mention no other topic, except that
dragons sometimes breathe fire.

The rest of the pipeline: :func:`train_story_tokenizer` (byte-level BPE as a
``PreTrainedTokenizerFast``), :func:`pack_stories` (fixed-length LM blocks) or
:func:`story_rows` (one story per row: no attention across stories, topics stay apart),
:func:`build_story_dataset` (a ``datasets.Dataset``) and :func:`tiny_story_model_config`
(a 1-layer GPT-NeoX or Llama config that learns the corpus in minutes on a CPU).
"""

from __future__ import annotations

import json
import os
import random
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CodebookError
from .tokfsm import derive_seed

EOS_TOKEN = "<|endoftext|>"
"""The tokenizer's one special token: BOS, EOS and padding (as in GPT-2 / GPT-NeoX)."""

# --------------------------------------------------------------------------- shared slots
GIRL_NAMES = ("Lily", "Mia", "Sue", "Anna", "Lucy", "Emma", "Sara", "Amy", "Zoe", "Ella",
              "Kate", "Molly", "Jenny", "Sophie", "Nina", "Grace", "Hannah", "Julia", "Maya",
              "Chloe")
BOY_NAMES = ("Tom", "Ben", "Max", "Sam", "Tim", "Jack", "Leo", "Finn", "Joe", "Jake", "Timmy",
             "Bob", "Alex", "Ryan", "Danny", "Oscar", "Henry", "Lucas", "Adam", "Eli")

_GIRL = {"kind": ("little girl", "girl", "little girl", "young girl"), "sub": "she",
         "obj": "her", "pos": "her", "sibword": "sister"}
_BOY = {"kind": ("little boy", "boy", "little boy", "young boy"), "sub": "he",
        "obj": "him", "pos": "his", "sibword": "brother"}

GENERIC_SLOTS: dict[str, tuple[str, ...]] = {
    "adj": ("little", "happy", "kind", "curious", "brave", "shy", "small", "cheerful",
            "clever", "gentle", "silly", "sweet", "friendly", "quiet"),
    "feeling": ("happy", "sad", "scared", "excited", "proud", "surprised", "tired",
                "curious", "calm", "worried", "glad", "nervous"),
    "weather": ("sunny", "warm", "windy", "cold", "bright", "cloudy", "quiet", "lovely"),
    "time": ("morning", "afternoon", "evening", "day"),
    "place": ("park", "forest", "farm", "village", "town", "school", "yard", "playground",
              "woods", "field", "market", "hill"),
    "home": ("house", "cottage", "village", "town", "farmhouse"),
    "food": ("cookies", "apples", "bread", "soup", "cake", "berries", "pancakes", "carrots",
             "sandwiches", "grapes"),
    "toy": ("ball", "kite", "doll", "truck", "teddy bear", "toy car", "yo-yo", "top",
            "puzzle", "wagon"),
    "color": ("red", "blue", "green", "yellow", "pink", "purple", "orange", "white"),
    "family": ("mom", "dad", "grandma", "grandpa", "aunt", "uncle"),
    "virtue": ("kind", "brave", "patient", "careful", "gentle", "helpful", "honest"),
    "num": ("two", "three", "four", "five"),
}

GENERIC_OPENINGS = (
    "Once upon a time, there was a {adj} {kind} named {name}.",
    "Once upon a time, in a small {home}, there lived a {adj} {kind} named {name}.",
    "One {weather} {time}, a {adj} {kind} named {name} went to the {place}.",
    "There once was a {adj} {kind} called {name}.",
    "{name} was a {adj} {kind} who loved to play outside.",
    "One day, {name} and {pos} {family} went for a walk in the {place}.",
    "Once upon a time, there was a {adj} {kind} named {name} who lived in a {home}.",
)
GENERIC_MIDDLES = (
    "{name} felt very {feeling}.",
    "It was a {weather} {time}, and {name} wanted to play.",
    "{sub} had a best friend named {friend}.",
    "{name} and {friend} played with a {color} {toy} in the {place}.",
    "{pos} {family} smiled and said, \"You are very {virtue}, {name}.\"",
    "{sub} ran to tell {pos} {family} all about it.",
    "After a while, {sub} ate some {food} and had a drink of juice.",
    "{name} thought for a moment.",
    "{friend} said, \"Let's go and see!\"",
    "They laughed and played together all {time}.",
    "{name} was a little {feeling}, but {sub} tried to be brave.",
    "The {place} was quiet and the sky was blue.",
    "{sub} took a deep breath and smiled.",
    "{name} asked {pos} {family}, \"Can {friend} come too?\"",
    "On the way, they shared some {food}.",
    "{name} looked around and saw {num} birds on a fence.",
    "{friend} was {feeling}, so {name} gave {friend} a big hug.",
    "It was a {weather} day, and everyone was {feeling}.",
)
GENERIC_ENDINGS = (
    "From that day on, {name} and {friend} were best friends.",
    "{name} went home and slept well that night.",
    "{name} smiled, because it had been the best day ever.",
    "{name} learned that it is good to be {virtue}.",
    "{sub} hugged {pos} {family} and said, \"Thank you!\"",
    "At the end of the day, {name} was tired but very {feeling}.",
)


@dataclass(frozen=True)
class Topic:
    """One topic: its mention regex, its slot values and its sentence templates."""

    name: str
    words: tuple[str, ...]
    """Regex alternatives (word-bounded, case-insensitive) that count as mentioning it."""
    slots: Mapping[str, tuple[str, ...]]
    openings: tuple[str, ...]
    """Openings that introduce ``{name}`` with a hint of the topic."""
    intros: tuple[str, ...]
    """Topic introductions; each one matches :attr:`words`."""
    middles: tuple[str, ...]
    endings: tuple[str, ...]


TOPICS: dict[str, Topic] = {}


def _topic(name: str, words: Sequence[str], slots: Mapping[str, Sequence[str]],
           openings: Sequence[str], intros: Sequence[str], middles: Sequence[str],
           endings: Sequence[str]) -> None:
    TOPICS[name] = Topic(name, tuple(words), {k: tuple(v) for k, v in slots.items()},
                         tuple(openings), tuple(intros), tuple(middles), tuple(endings))


_topic(
    "dragon", ["dragons?"],
    {"dname": ("Puff", "Spike", "Ruby", "Grog", "Zog", "Pip", "Flick", "Drago"),
     "dadj": ("big", "green", "red", "friendly", "sleepy", "old", "shiny", "gentle", "tiny",
              "purple"),
     "dplace": ("deep cave", "tall mountain", "dark cave", "rocky hill", "hidden valley"),
     "dcolor": ("green", "red", "gold", "blue", "purple", "silver"),
     "dthing": ("treasure", "gold coins", "shiny gems", "glowing stones"),
     "dland": ("hills", "mountains", "forest", "rivers", "fields", "clouds")},
    ["Once upon a time, there was a {adj} {kind} named {name} who loved dragons.",
     "Once upon a time, {name} lived in a village near a {dplace} where a dragon lived.",
     "Long ago, a {adj} {kind} named {name} lived at the foot of a {dplace}."],
    ["{name} had always wanted to meet a real dragon.",
     "One day, {name} found a {dadj} dragon sleeping in a {dplace}.",
     "{sub} heard a loud roar and saw a {dadj} dragon flying over the trees.",
     "In the {dplace}, there lived a {dadj} dragon named {dname}.",
     "{name} saw the dragon {dname} resting on a pile of {dthing}."],
    ["The dragon spread its {dcolor} wings and flew high into the sky.",
     "{dname} the dragon breathed fire to keep them warm.",
     "The dragon's scales were {dcolor} and shiny.",
     "{name} climbed onto the dragon's back and held on tight.",
     "The dragon gave a big roar, but it was only saying hello.",
     "{name} was {feeling} at first, but the dragon was friendly.",
     "Together they flew over the {dland} and the {dland2}.",
     "The dragon showed {name} a {dplace} full of {dthing}.",
     "{dname} flapped its wings and the trees shook.",
     "{name} gave the dragon some {food}, and the dragon purred like a cat.",
     "Some people in the village were afraid of the dragon.",
     "The dragon had sharp claws, {dcolor} scales and a long tail."],
    ["From that day on, {name} and {dname} the dragon were best friends.",
     "Every night, {name} dreamed of flying with the dragon.",
     "The dragon flew back to its {dplace}, and {name} waved goodbye.",
     "Now the whole village loved the friendly dragon."],
)
_topic(
    "flower", ["flowers?", "petals?", "bloom\\w*", "tulips?", "daisy", "daisies",
               "sunflowers?", "lilies"],
    {"fkind": ("roses", "tulips", "daisies", "sunflowers", "lilies", "violets"),
     "fcolor": ("red", "yellow", "pink", "white", "purple", "blue", "orange"),
     "gplace": ("garden", "meadow", "field", "window box", "flower pot", "backyard")},
    ["Once upon a time, there was a {adj} {kind} named {name} who loved flowers.",
     "{name} lived in a little {home} with a big garden full of flowers.",
     "One spring morning, a {adj} {kind} named {name} went out to the garden."],
    ["{name} planted a tiny seed in {pos} garden, hoping it would grow into a flower.",
     "One day, {name} found a {fcolor} flower growing in the {gplace}.",
     "In the garden, there were {fcolor} {fkind} and {fcolor2} {fkind2}.",
     "Every morning, {name} watered the flowers in the {gplace}."],
    ["The petals were soft and {fcolor}.",
     "A bee buzzed around the {fkind}, looking for sweet nectar.",
     "{name} smelled the flower, and it smelled sweet.",
     "{sub} picked a few {fkind} for {pos} {family}.",
     "The little seed began to grow, and soon a bud appeared.",
     "The flowers bloomed in the warm sun.",
     "A butterfly landed on a {fcolor} petal.",
     "{name} gave the flowers some water every day.",
     "The {gplace} was full of {fcolor} and {fcolor2} flowers.",
     "One of the flowers was drooping, so {name} gave it fresh water."],
    ["Soon the whole garden was full of beautiful flowers.",
     "{name} gave the flower to {pos} {family}, who smiled and put it in a vase.",
     "Every spring, the flowers bloomed again, and {name} was happy.",
     "{name} learned that flowers need love and care to grow."],
)
_topic(
    "fire", ["fires?", "campfires?", "fireplace", "firefighters?", "fire truck", "flames?",
             "smoke"],
    {"fplace": ("old barn", "kitchen", "shed", "woods", "house next door", "forest"),
     "fsize": ("small", "big", "warm", "bright", "crackling"),
     "fcolor": ("orange", "red", "yellow", "bright", "golden")},
    ["Once upon a time, there was a {adj} {kind} named {name} who wanted to be a firefighter.",
     "One cold night, {name} sat by the fire with {pos} {family}.",
     "{name} was a {adj} {kind} who loved the big red fire truck in town."],
    ["One day, {name} saw smoke coming from the {fplace}.",
     "{name} and {pos} {family} made a {fsize} campfire in the woods.",
     "There was a {fsize} fire in the fireplace, and the house was warm.",
     "Suddenly, the {fplace} caught fire."],
    ["The flames were {fcolor} and {fcolor2}, and they danced in the dark.",
     "The firefighters came with a long hose and sprayed water on the flames.",
     "The fire crackled and popped.",
     "{pos} {family} said, \"Never play with fire, it is very hot.\"",
     "They roasted marshmallows over the fire.",
     "{name} felt the warm fire on {pos} face.",
     "Gray smoke went up into the sky.",
     "The fire truck raced down the street with its siren on.",
     "{name} helped carry buckets of water to put out the fire.",
     "A firefighter gave {name} a shiny red helmet."],
    ["When the fire was out, everyone cheered for the brave firefighters.",
     "{name} learned that fire is warm and bright, but it can be dangerous.",
     "That night, {name} fell asleep next to the warm fire.",
     "When {sub} grew up, {name} became a brave firefighter."],
)
_topic(
    "baby", ["bab(?:y|ies)", "crib", "rattle", "cradle", "stroller"],
    {"bname": ("Jamie", "Bella", "Milo", "Nora", "Ollie", "Ivy", "Theo", "Luna"),
     "sib": ("brother", "sister")},
    ["Once upon a time, there was a {adj} {kind} named {name} who had a new baby {sib}.",
     "{name} lived with {pos} mom, {pos} dad and {pos} baby {sib}.",
     "One {weather} {time}, {name} waited for {pos} mom to come home with the baby."],
    ["One day, Mom came home with a tiny baby {sib} named {bname}.",
     "The baby, {bname}, was very small and slept in a crib.",
     "{name}'s baby {sib} {bname} cried a lot at night.",
     "{name} wanted to help take care of the baby."],
    ["The baby had tiny hands and tiny feet.",
     "{name} shook a {color} rattle, and the baby laughed.",
     "{sub} hummed a soft lullaby to the baby.",
     "The baby started to cry, so {name} made a funny face.",
     "Mom fed the baby a warm bottle of milk.",
     "{name} helped push the stroller to the {place}.",
     "{bname} grabbed {name}'s finger and would not let go.",
     "{name} rocked the cradle gently until the baby fell asleep.",
     "The baby's first word was \"{name}!\"",
     "{name} gave the baby a soft {toy} to hold."],
    ["{name} kissed the baby goodnight and went to bed.",
     "{name} was proud to be a big {sibword} to the baby.",
     "From that day on, {name} loved {pos} baby {sib} very much.",
     "The baby smiled, and {name} knew they would always be friends."],
)
_topic(
    "princess", ["princess(?:es)?", "prince", "castles?", "crowns?", "queen", "king",
                 "kingdom", "royal"],
    {"pname": ("Lila", "Aurora", "Belle", "Stella", "Elena", "Clara", "Fiona", "Isabel"),
     "dress": ("pink", "blue", "golden", "white", "purple", "silver", "sparkly"),
     "gem": ("red jewels", "blue gems", "tiny pearls", "green stones", "bright diamonds")},
    ["Once upon a time, in a faraway kingdom, there lived a {adj} {kind} named {name}.",
     "Long ago, a {adj} {kind} named {name} lived near a big castle.",
     "Once upon a time, there was a {adj} {kind} named {name} who wanted to meet a princess."],
    ["In the castle on the hill lived a kind princess named {pname}.",
     "One day, {name} was invited to the princess's big party at the castle.",
     "{name} met Princess {pname}, who wore a {dress} dress and a shiny crown.",
     "{name} dreamed of being a princess and living in a castle."],
    ["The princess had a golden crown with {gem} on it.",
     "The castle had tall towers and a big gate.",
     "The king and queen had a big feast in the great hall.",
     "Princess {pname} danced with the prince at the ball.",
     "{name} and the princess had tea in the royal garden.",
     "The princess lost her crown, and {name} helped look for it.",
     "{name} bowed to the queen and said hello.",
     "The princess was kind to everyone in the kingdom.",
     "A guard opened the big castle doors.",
     "Princess {pname} wore a {dress} dress that sparkled in the light."],
    ["The princess thanked {name} and gave {obj} a little crown.",
     "From that day on, {name} and Princess {pname} were best friends.",
     "Everyone in the kingdom lived happily ever after.",
     "{name} went home and dreamed of castles and crowns."],
)
_topic(
    "ocean", ["oceans?", "seas?", "beach(?:es)?", "waves?", "seashells?", "shells?", "whales?",
              "sandcastles?"],
    {"sea_animal": ("fish", "crab", "starfish", "dolphin", "turtle", "seal"),
     "wadj": ("gentle", "tall", "splashy", "loud", "sparkly", "white")},
    ["Once upon a time, there was a {adj} {kind} named {name} who lived near the sea.",
     "One summer, {name} went to the beach with {pos} {family}.",
     "{name} was a {adj} {kind} who lived in a little {home} by the ocean."],
    ["{name} loved to play at the beach by the ocean.",
     "The ocean was big and blue, and the waves were {wadj}.",
     "One day, {name} found a {color} seashell on the beach.",
     "{name} and {pos} {family} took a little boat out on the sea."],
    ["{sub} built a big sandcastle near the water.",
     "A little {sea_animal} swam past {name}'s feet.",
     "The waves splashed, and {name} laughed.",
     "{name} saw a whale jump out of the water far away.",
     "{name} collected shells and put them in a bucket.",
     "The salty wind blew through {pos} hair.",
     "A {sea_animal} peeked out from under a rock.",
     "The sand was warm under {pos} feet.",
     "{name} dipped {pos} toes in the cool sea water.",
     "A {sea_animal} and a {sea_animal2} played in the waves."],
    ["When the sun went down, {name} waved goodbye to the ocean.",
     "{name} kept the seashell to remember the beach.",
     "That night, {name} dreamed of the deep blue sea.",
     "{name} could not wait to come back to the beach."],
)
_topic(
    "dog", ["dogs?", "pupp(?:y|ies)", "bark(?:s|ed|ing)?", "woof"],
    {"dogname": ("Buddy", "Rex", "Spot", "Biscuit", "Lucky", "Pepper", "Coco", "Sparky"),
     "dogadj": ("fluffy", "brown", "little", "spotted", "playful", "big", "black", "happy")},
    ["Once upon a time, there was a {adj} {kind} named {name} who had a dog named {dogname}.",
     "{name} was a {adj} {kind} who always wanted a puppy.",
     "One {weather} {time}, {name} took {pos} dog for a walk in the {place}."],
    ["{name} had a {dogadj} dog named {dogname}.",
     "One day, {name} found a lost puppy in the {place}.",
     "{name}'s dog, {dogname}, loved to run and play.",
     "{dogname} was a {dogadj} puppy with a waggy tail."],
    ["{dogname} wagged his tail and barked happily.",
     "{name} threw a stick, and the dog ran to fetch it.",
     "The dog licked {name}'s face.",
     "{dogname} dug a hole in the yard and found an old bone.",
     "{name} put a leash on {dogname}, and they went for a walk.",
     "The puppy chased a butterfly around the yard.",
     "{dogname} barked at a squirrel in the tree.",
     "{name} gave the dog a bath, and it splashed water everywhere.",
     "The dog was hungry, so {name} filled his bowl with food.",
     "{dogname} the dog brought {name} a {color} {toy}."],
    ["{name} hugged {dogname}, the best dog in the world.",
     "That night, the puppy slept at the end of {name}'s bed.",
     "From that day on, {name} and {dogname} the dog went everywhere together.",
     "{name} knew that a dog is a true friend."],
)
_topic(
    "rain", ["rain\\w*", "umbrellas?", "puddles?", "storms?", "thunder"],
    {"rtime": ("morning", "afternoon", "evening", "night")},
    ["One {rtime}, {name} woke up to the sound of rain on the window.",
     "Once upon a time, there was a {adj} {kind} named {name} who loved rainy days.",
     "{name} was a {adj} {kind} who had a {color} umbrella."],
    ["Dark clouds filled the sky, and it began to rain.",
     "It was a rainy day, and {name} could not play outside.",
     "{name} put on {pos} {color} raincoat and took {pos} umbrella.",
     "Big drops of rain fell on the roof."],
    ["{name} jumped in the puddles and made a big splash.",
     "The raindrops tapped on the window like tiny feet.",
     "Thunder boomed, and {name} hid under a blanket.",
     "{name} watched the rain from the window.",
     "The rain made the grass green and wet.",
     "A little frog hopped happily in the rain.",
     "{name} and {friend} shared an umbrella on the way home.",
     "Rain water ran down the street in little rivers.",
     "{name}'s boots were full of rain water.",
     "{name} held out {pos} hand to catch the raindrops."],
    ["When the rain stopped, a big rainbow appeared in the sky.",
     "{name} learned that rainy days can be fun too.",
     "After the storm, the sun came out again.",
     "{name} fell asleep listening to the soft rain."],
)
_topic(
    "music", ["music\\w*", "songs?", "sing(?:s|ing|er|ers)?", "sang", "pianos?", "drums?",
              "guitars?", "violins?", "flutes?", "trumpets?", "melody"],
    {"instrument": ("piano", "drum", "guitar", "violin", "flute", "trumpet")},
    ["Once upon a time, there was a {adj} {kind} named {name} who loved music.",
     "{name} was a {adj} {kind} who wanted to play in a band and sing.",
     "One {weather} {time}, {name} heard someone singing in the {place}."],
    ["{name} got a shiny new {instrument} for {pos} birthday and loved the music it made.",
     "Every day, {name} practiced playing music on the {instrument}.",
     "{name} liked to sing songs with {pos} {family}.",
     "One day, {name} heard beautiful music coming from the {place}."],
    ["At first the notes sounded funny, but {name} did not give up.",
     "{name} sang a happy song about the sun.",
     "{friend} played the {instrument2} and {name} played the {instrument}.",
     "The music was so lively that everyone started to dance.",
     "{name} tapped {pos} feet to the beat.",
     "An old man in the {place} taught {name} a new song.",
     "Soon, {name} could play a whole song without a mistake.",
     "The birds seemed to sing along.",
     "{name} played the {instrument} loud and then soft.",
     "Everyone clapped when {name} finished the song."],
    ["At the big show, {name} played the {instrument} and everyone clapped.",
     "From that day on, {name} played music every day.",
     "{name} learned that practice makes music sound better.",
     "That night, {name} hummed the new song as {sub} fell asleep."],
)
_topic(
    "space", ["space\\w*", "rockets?", "astronauts?", "planets?", "moon", "stars?", "aliens?"],
    {"planet_color": ("red", "blue", "purple", "green", "orange", "shiny")},
    ["Once upon a time, there was a {adj} {kind} named {name} who wanted to go to space.",
     "{name} was a {adj} {kind} who loved to look at the stars at night.",
     "One clear night, {name} looked up at the moon from {pos} window."],
    ["{name} built a rocket out of a big box.",
     "One night, a shiny spaceship landed in {name}'s yard.",
     "{name} dreamed of being an astronaut and flying to the moon.",
     "{name} looked up at the stars and wondered what was out there."],
    ["The rocket went up, up, up into space.",
     "{name} floated in the spaceship and giggled.",
     "They flew past the moon and the bright stars.",
     "On a {planet_color} planet, {name} met a friendly alien.",
     "The alien had {num} eyes and a big smile.",
     "{name} put on a helmet and a space suit.",
     "Earth looked like a tiny blue ball far away from the rocket.",
     "{name} counted the stars: one, two, three, so many!",
     "The astronaut waved at {name} from the window of the rocket.",
     "The {planet_color} planet had {num} moons."],
    ["When the rocket landed back home, {name} told everyone about space.",
     "{name} fell asleep dreaming of stars and planets.",
     "{name} knew that one day {sub} would be a real astronaut.",
     "The friendly alien waved goodbye and flew back to its planet."],
)

TOPIC_NAMES: tuple[str, ...] = tuple(TOPICS)
"""All topics, in a fixed order."""

# Slots whose value is drawn once per story (names and the like stay consistent).
_PER_STORY = {"name", "friend", "sub", "obj", "pos", "kind", "sibword", "dname", "bname",
              "sib", "pname", "dogname", "instrument", "family"}
_FORMATTER = string.Formatter()


def _check_topic(topic: str) -> Topic:
    if topic not in TOPICS:
        raise CodebookError(f"unknown story topic {topic!r}; choose from {', '.join(TOPICS)}")
    return TOPICS[topic]


def topic_words(topic: str) -> tuple[str, ...]:
    """The regex alternatives (case-insensitive, whole words) that count as mentioning
    ``topic``, e.g. ``('dragons?',)``; see :func:`topic_regex`."""
    return _check_topic(topic).words


def topic_regex(topic: str) -> re.Pattern[str]:
    """Compiled regex matching a mention of ``topic`` (whole words, case-insensitive)."""
    return re.compile(r"\b(?:" + "|".join(topic_words(topic)) + r")\b", re.IGNORECASE)


def mentions_topic(text: str, topic: str) -> bool:
    """Whether ``text`` mentions ``topic`` (the steering evaluation's criterion)."""
    return topic_regex(topic).search(text) is not None


def topic_mentions(text: str, topics: Iterable[str] | None = None) -> list[str]:
    """The topics (of ``topics``, default all) that ``text`` mentions, in topic order."""
    return [t for t in (TOPIC_NAMES if topics is None else topics) if mentions_topic(text, t)]


# --------------------------------------------------------------------------- generation
@dataclass
class StoryConfig:
    """What :func:`generate_stories` writes."""

    num_stories: int = 10000
    topics: tuple[str, ...] = field(default_factory=lambda: TOPIC_NAMES)
    """Main topics, assigned in balanced shuffled rounds (each round has every topic once)."""
    seed: int = 0
    min_sentences: int = 3
    max_sentences: int = 8
    topic_prob: float = 0.65
    """Chance that a middle sentence is a topic sentence rather than a generic one."""

    def __post_init__(self) -> None:
        self.topics = tuple(self.topics)
        self.validate()

    def validate(self) -> None:
        """Raise CodebookError for an impossible configuration."""
        for name in ("num_stories", "seed", "min_sentences", "max_sentences"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise CodebookError(f"StoryConfig.{name}={v!r}: must be an integer")
        if self.num_stories < 1:
            raise CodebookError(f"StoryConfig.num_stories={self.num_stories}: must be >= 1")
        if not self.topics:
            raise CodebookError("StoryConfig.topics is empty; name at least one topic")
        for t in self.topics:
            _check_topic(t)
        if len(set(self.topics)) != len(self.topics):
            raise CodebookError(f"StoryConfig.topics={self.topics}: a topic is repeated")
        if not 2 <= self.min_sentences <= self.max_sentences:
            raise CodebookError(
                f"StoryConfig sentences {self.min_sentences}..{self.max_sentences}: need "
                "2 <= min_sentences <= max_sentences")
        if not 0.0 <= float(self.topic_prob) <= 1.0:
            raise CodebookError(f"StoryConfig.topic_prob={self.topic_prob}: must be in [0, 1]")


def _fill(template: str, rng: random.Random, story_slots: dict[str, str],
          topic: Topic) -> str:
    values: dict[str, str] = {}

    def value_of(key: str) -> str:
        if key in values:
            return values[key]
        if key in story_slots:
            values[key] = story_slots[key]
            return values[key]
        base = key[:-1] if key.endswith("2") else key
        choices = topic.slots.get(base) or GENERIC_SLOTS[base]
        value = rng.choice(choices)
        if base != key:  # "x2": a second value of slot x, different from x's
            first = value_of(base)
            while value == first and len(set(choices)) > 1:
                value = rng.choice(choices)
        if base in _PER_STORY:
            story_slots[key] = value
        values[key] = value
        return value

    for _, key, _, _ in _FORMATTER.parse(template):
        if key is not None:
            value_of(key)
    text = _ARTICLE.sub(r"\1n ", template.format(**values))
    return text[0].upper() + text[1:]


def _story_slots(rng: random.Random) -> dict[str, str]:
    girl = rng.random() < 0.5
    p = _GIRL if girl else _BOY
    name = rng.choice(GIRL_NAMES if girl else BOY_NAMES)
    friend = rng.choice([n for n in GIRL_NAMES + BOY_NAMES if n != name])
    return {"name": name, "friend": friend, "kind": rng.choice(p["kind"]), "sub": p["sub"],
            "obj": p["obj"], "pos": p["pos"], "sibword": p["sibword"]}


def generate_story(topic: str, rng: random.Random, min_sentences: int = 3,
                   max_sentences: int = 8, topic_prob: float = 0.65) -> str:
    """One story about ``topic`` drawn with ``rng``.

    Plan: opening (topic-flavoured half the time), topic introduction, middle sentences
    (topic sentences with chance ``topic_prob``, else generic; no template twice), ending
    (a topic ending 70% of the time). At least two sentences are topic sentences.
    """
    t = _check_topic(topic)
    slots = _story_slots(rng)
    n = rng.randint(min_sentences, max_sentences)
    opening = rng.choice(t.openings if rng.random() < 0.5 else GENERIC_OPENINGS)
    plan = [opening, rng.choice(t.intros)]
    if n >= 3:
        middles_t = list(t.middles)
        middles_g = list(GENERIC_MIDDLES)
        rng.shuffle(middles_t)
        rng.shuffle(middles_g)
        for _ in range(n - 3):
            pool = middles_t if (rng.random() < topic_prob and middles_t) or not middles_g \
                else middles_g
            plan.append(pool.pop())
        topic_count = sum(s in t.middles or s in t.openings for s in plan) + 1
        use_topic_end = rng.random() < 0.7 or topic_count < 2
        plan.append(rng.choice(t.endings if use_topic_end else GENERIC_ENDINGS))
    return " ".join(_fill(s, rng, slots, t) for s in plan[:n])


def story_topics(config: StoryConfig) -> list[str]:
    """The main topic of every story of ``config``: balanced shuffled rounds."""
    out: list[str] = []
    rounds = -(-config.num_stories // len(config.topics))
    for r in range(rounds):
        order = list(config.topics)
        random.Random(derive_seed(config.seed, f"stories-round{r}")).shuffle(order)
        out.extend(order)
    return out[: config.num_stories]


def generate_stories(config: StoryConfig | None = None, **overrides: Any) -> list[dict[str, Any]]:
    """``config.num_stories`` stories as ``{"text", "topic"}`` dicts, deterministic given the
    config; story ``i`` depends only on ``(seed, i)`` and its topic. Keyword arguments
    override config fields (``generate_stories(num_stories=100, seed=1)``)."""
    config = config or StoryConfig()
    if overrides:
        try:
            config = StoryConfig(**{**config.__dict__, **overrides})
        except TypeError as e:
            raise CodebookError(f"generate_stories: {e}; pass StoryConfig fields") from None
    config.validate()
    out = []
    for i, topic in enumerate(story_topics(config)):
        rng = random.Random(derive_seed(config.seed, f"story{i}"))
        text = generate_story(topic, rng, config.min_sentences, config.max_sentences,
                              config.topic_prob)
        out.append({"text": text, "topic": topic})
    return out


_SENTENCE_END = re.compile(r'(?:(?<=[.!?])|(?<=[.!?]"))\s+(?=[A-Z"])')
_ARTICLE = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


def split_sentences(text: str) -> list[str]:
    """Split a story into sentences (after ``.``, ``!`` or ``?``, closing quotes kept)."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


# --------------------------------------------------------------------------- files
def _texts(stories: Iterable[Mapping[str, Any] | str]) -> list[str]:
    return [s if isinstance(s, str) else str(s["text"]) for s in stories]


def write_corpus(path: str | os.PathLike, stories: Sequence[Mapping[str, Any]] | None = None,
                 config: StoryConfig | None = None) -> Path:
    """Write stories (or ``generate_stories(config)``) to ``path``: ``.txt`` holds one story
    per line, ``.jsonl`` one ``{"text", "topic"}`` object per line. Returns the path."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise CodebookError(f"write_corpus({path}): unknown format; name a .txt or .jsonl file")
    if stories is None:
        stories = generate_stories(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for s in stories:
            if path.suffix == ".txt":
                f.write(_texts([s])[0].replace("\n", " ") + "\n")
            else:
                f.write(json.dumps(dict(s), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_corpus(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a corpus written by :func:`write_corpus` (``.txt`` rows have only ``text``)."""
    path = Path(path)
    if not path.is_file():
        raise CodebookError(f"{path}: file not found; check the path or call write_corpus")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if path.suffix != ".jsonl":
        return [{"text": ln} for ln in lines]
    try:
        return [json.loads(ln) for ln in lines]
    except json.JSONDecodeError as e:
        raise CodebookError(f"{path}: line is not JSON ({e.msg}); write the corpus again") \
            from None


# --------------------------------------------------------------------------- tokenizer
def train_story_tokenizer(texts: Iterable[str | Mapping[str, Any]], vocab_size: int = 1024,
                          model_max_length: int = 512):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a
    ``transformers.PreTrainedTokenizerFast``.

    ``<|endoftext|>`` (id 0) is BOS, EOS, padding and unknown token. Encoding adds BOS in
    front (``add_special_tokens=False`` to leave it out), never EOS. Deterministic given the
    texts; saves with ``save_pretrained`` and loads with ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = _texts(texts)
    if not texts:
        raise CodebookError("train_story_tokenizer: no texts; pass the generated stories")
    if not 300 <= int(vocab_size) <= 65536:
        raise CodebookError(f"train_story_tokenizer(vocab_size={vocab_size}): needs 300..65536 "
                            "(256 bytes, the special token and some merges)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size), special_tokens=[EOS_TOKEN], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(sorted(texts), trainer=trainer)
    bos_id = tok.token_to_id(EOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOS_TOKEN} $A", pair=f"{EOS_TOKEN} $A {EOS_TOKEN} $B",
        special_tokens=[(EOS_TOKEN, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN, model_max_length=model_max_length)


def pack_stories(tokenizer: Any, stories: Iterable[str | Mapping[str, Any]], seq_len: int = 128,
                 drop_last: bool = True) -> torch.Tensor:
    """Token blocks for LM training: every story is ``<|endoftext|> story``, the stories are
    concatenated in order and cut into ``(n, seq_len)`` rows (a short tail is dropped, or
    padded with the EOS id if ``drop_last`` is False)."""
    if seq_len < 2:
        raise CodebookError(f"pack_stories(seq_len={seq_len}): must be >= 2")
    texts = _texts(stories)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.append(eos)
        ids.extend(row)
    n = len(ids) // seq_len
    if not drop_last and len(ids) % seq_len:
        ids.extend([eos] * (seq_len - len(ids) % seq_len))
        n += 1
    if n == 0:
        raise CodebookError(f"pack_stories: {len(ids)} tokens do not fill one block of "
                            f"{seq_len}; pass more stories or a shorter seq_len")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def story_rows(tokenizer: Any, stories: Iterable[str | Mapping[str, Any]],
               max_len: int = 128) -> dict[str, torch.Tensor]:
    """One story per row, for LM training without attention across stories: each row is
    ``<|endoftext|> story <|endoftext|>`` cut to ``max_len`` and padded with the EOS id to the
    longest row. Returns ``input_ids``, ``attention_mask`` (0 on padding) and ``labels``
    (-100 on padding; the closing EOS is a label, so the model learns where stories end)."""
    if max_len < 2:
        raise CodebookError(f"story_rows(max_len={max_len}): must be >= 2")
    texts = _texts(stories)
    if not texts:
        raise CodebookError("story_rows: no stories; pass at least one")
    eos = tokenizer.eos_token_id
    rows = [([eos] + r + [eos])[:max_len]
            for r in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), eos, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100)}


def build_story_dataset(stories: Sequence[Mapping[str, Any]] | StoryConfig | None = None,
                        tokenizer: Any = None, seq_len: int | None = None,
                        packed: bool = True):
    """A ``datasets.Dataset`` of stories.

    Without ``seq_len``: one row per story, columns ``text`` and ``topic`` (and
    ``input_ids``, BOS first, if a ``tokenizer`` is given). With ``seq_len`` (needs the
    tokenizer): LM training rows of equal length, either packed blocks from
    :func:`pack_stories` (columns ``input_ids`` and ``labels``, a copy: causal LMs shift
    labels themselves) or, with ``packed=False``, one story per row from :func:`story_rows`
    (``input_ids``, ``attention_mask``, ``labels``).
    """
    from datasets import Dataset

    if stories is None or isinstance(stories, StoryConfig):
        stories = generate_stories(stories)
    if not stories:
        raise CodebookError("build_story_dataset: no stories; pass at least one")
    if seq_len is not None:
        if tokenizer is None:
            raise CodebookError("build_story_dataset(seq_len=...) needs a tokenizer; pass "
                                "tokenizer=train_story_tokenizer(...)")
        if not packed:
            return Dataset.from_dict({k: v.tolist() for k, v in
                                      story_rows(tokenizer, stories, seq_len).items()})
        ids = pack_stories(tokenizer, stories, seq_len).tolist()
        return Dataset.from_dict({"input_ids": ids, "labels": [list(r) for r in ids]})
    cols: dict[str, list] = {"text": _texts(stories),
                             "topic": [str(s.get("topic", "")) for s in stories]}
    if tokenizer is not None:
        cols["input_ids"] = tokenizer(cols["text"])["input_ids"]
    return Dataset.from_dict(cols)


# --------------------------------------------------------------------------- model
def tiny_story_model_config(tokenizer: Any, arch: str = "gpt_neox", hidden_size: int = 128,
                            num_layers: int = 1, num_heads: int = 4,
                            intermediate_size: int | None = None,
                            max_position_embeddings: int = 512, **kwargs: Any):
    """A small causal-LM config for the story corpus (default: GPT-NeoX, 1 layer, hidden 128,
    4 heads, MLP 4x hidden), with the tokenizer's vocabulary and special token ids.
    ``arch`` is ``"gpt_neox"`` or ``"llama"``; extra keyword arguments go to the config."""
    import transformers as T

    if hidden_size % num_heads:
        raise CodebookError(f"tiny_story_model_config: hidden_size={hidden_size} is not a "
                            f"multiple of num_heads={num_heads}; change one of them")
    inter = intermediate_size or 4 * hidden_size
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    common = {"hidden_size": hidden_size, "num_hidden_layers": num_layers,
              "num_attention_heads": num_heads, "intermediate_size": inter,
              "max_position_embeddings": max_position_embeddings, **ids}
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(**{**common, **kwargs})
    if arch == "llama":
        return T.LlamaConfig(**{**common, "num_key_value_heads": num_heads,
                                "tie_word_embeddings": True, **kwargs})
    raise CodebookError(f"tiny_story_model_config(arch={arch!r}): use 'gpt_neox' or 'llama'")
