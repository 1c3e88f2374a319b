"""The story topics and the sentence templates stories are assembled from (DESIGN §2).

Ten topics (dragon, flower, fire, baby, princess, ocean, dog, rain, music, space), each with
its core words, topic sentences and slots, and the shared openings, middles and endings.
:func:`topic_regex` is what "mentions the topic" means in the steering evaluation: the
topic's core words (e.g. ``dragon``/``dragons``; ``flower``, ``petals``, ``bloom``...).
Generic sentences mention no topic; topic sentences mention no other topic, except that
dragons sometimes breathe fire.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ...errors import CodebookError
from ...topics import TOPIC_WORDS, words_regex

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


def _topic(name: str, slots: Mapping[str, Sequence[str]], openings: Sequence[str],
           intros: Sequence[str], middles: Sequence[str], endings: Sequence[str]) -> None:
    """A topic whose mentions are its words in the library's vocabulary
    (:data:`codebook_features.topics.TOPIC_WORDS`)."""
    TOPICS[name] = Topic(name, TOPIC_WORDS[name], {k: tuple(v) for k, v in slots.items()},
                         tuple(openings), tuple(intros), tuple(middles), tuple(endings))


_topic(
    "dragon",
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
    "flower",
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
    "fire",
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
    "baby",
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
    "princess",
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
    "ocean",
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
    "dog",
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
    "rain",
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
    "music",
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
    "space",
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
_ARTICLE = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


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
    return words_regex(topic_words(topic))


def mentions_topic(text: str, topic: str) -> bool:
    """Whether ``text`` mentions ``topic`` (the steering evaluation's criterion)."""
    return topic_regex(topic).search(text) is not None


def topic_mentions(text: str, topics: Iterable[str] | None = None) -> list[str]:
    """The topics (of ``topics``, default all) that ``text`` mentions, in topic order."""
    return [t for t in (TOPIC_NAMES if topics is None else topics) if mentions_topic(text, t)]


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
